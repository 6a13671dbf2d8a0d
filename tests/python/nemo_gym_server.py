"""Starts one NeMo Gym resources server (from the installed `nemo-gym` package) on 127.0.0.1.

    python nemo_gym_server.py NAME PORT

NAME is a folder under the package's `resources_servers/` (mcqa, structured_outputs,
reasoning_gym, math_with_judge, example_single_tool_call, ...). The server runs in the
foreground until killed, as `python app.py` from its folder with the configuration NeMo Gym's
launcher would give it; math_with_judge runs with its judge model off. Used by
tests/nemo_gym_real.rs; also handy to try a server by hand.
"""

import json
import os
import sys

import resources_servers


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    name, port = sys.argv[1], int(sys.argv[2])
    folder = os.path.join(list(resources_servers.__path__)[0], name)
    if not os.path.isfile(os.path.join(folder, "app.py")):
        sys.exit(f"no resources server `{name}` in {folder}")
    server = {"entrypoint": "app.py", "host": "127.0.0.1", "port": port, "domain": "other"}
    config = {
        "head_server": {"host": "127.0.0.1", "port": port + 1},
        "dry_run": False,
        name: {"resources_servers": {name: server}},
    }
    if name == "math_with_judge":
        server.update(
            judge_model_server={"type": "responses_api_models", "name": "none"},
            judge_responses_create_params={"input": []},
            should_use_judge=False,
        )
    os.environ["NEMO_GYM_CONFIG_PATH"] = name
    os.environ["NEMO_GYM_CONFIG_DICT"] = json.dumps(config)
    os.chdir(folder)
    sys.path.insert(0, folder)
    sys.argv = ["app.py"]
    with open("app.py") as f:
        code = compile(f.read(), os.path.join(folder, "app.py"), "exec")
    exec(code, {"__name__": "__main__", "__file__": os.path.join(folder, "app.py")})


if __name__ == "__main__":
    main()
