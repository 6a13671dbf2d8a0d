"""Test runner written by chorus' `swe` environment into the sandbox beside the repository.

Usage: python3 -I -B run_tests.py TEST_FILE...; the first line of stdin is a nonce. Imports each
test module from the working directory and calls its `test*` functions in definition order,
catching everything they raise. Prints one line, the nonce then a JSON list of
{"test", "ok", "error"}, written straight to file descriptor 1 so that repository code that
replaces sys.stdout cannot forge it (and cannot know the nonce without going out of its way)."""

import importlib
import json
import os
import sys

_write = os.write
_dumps = json.dumps


def _describe(err):
    text = "%s: %s" % (type(err).__name__, err)
    return text if len(text) <= 300 else text[:300] + "..."


def main():
    nonce = sys.stdin.readline().strip()
    sys.path.insert(0, os.getcwd())
    results = []
    for path in sys.argv[1:]:
        module_name = path[:-3] if path.endswith(".py") else path
        try:
            module = importlib.import_module(module_name)
        except BaseException as err:
            results.append({"test": module_name, "ok": False, "error": "import failed: " + _describe(err)})
            continue
        for name, value in list(vars(module).items()):
            if not name.startswith("test") or not callable(value):
                continue
            label = "%s.%s" % (module_name, name)
            try:
                value()
            except BaseException as err:
                results.append({"test": label, "ok": False, "error": _describe(err)})
            else:
                results.append({"test": label, "ok": True, "error": ""})
    _write(1, ("\n" + nonce + " " + _dumps(results) + "\n").encode())


main()
