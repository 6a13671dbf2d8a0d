"""Drives a real orchestrator with chorus_env.client. Run by tests/cli_serve.rs:

    python orchestrator_client.py URL TOKEN CONFIG

Launches CONFIG, follows its events to the end, reads its summary and rollouts (and a
DataFrame of them when pandas is installed), launches again with the same request id (the
same run comes back), and prints what it saw as one JSON object.
"""

import json
import sys

from chorus_env.client import Client


def main():
    url, token, config = sys.argv[1:4]
    with Client(url, token=token) as c:
        run = c.launch(config, name="from-python", eval_tasks=2, request_id="py-1")
        kinds = [e["kind"] for e in c.watch(run["run_id"])]
        final = c.run(run["run_id"])
        again = c.launch(config, name="from-python", request_id="py-1")
        summary = c.summary(run["run_id"])
        rollouts = c.rollouts(run["run_id"], limit=20)
        scored = c.rollouts(run["run_id"], min_reward=0.0, limit=1000)
        try:
            frame_rows = len(c.rollouts_frame(run["run_id"], limit=20))
        except ImportError:
            frame_rows = None
        print(json.dumps({
            "run_id": run["run_id"], "created": run["created"], "status": final["status"],
            "again": again["run_id"], "again_created": again["created"],
            "learner_step": final["learner_step"], "kinds": kinds,
            "listed": [r["run_id"] for r in c.runs()],
            "stages": [(s["name"], s["kind"], s["status"], s["summary"] is not None)
                       for s in summary["stages"]],
            "learner_steps": summary["learner_steps"],
            "evaluations": len(summary["evaluations"]),
            "rollouts": rollouts, "scored": len(scored),
            "min_scored_reward": min((r["reward"] for r in scored), default=None),
            "frame_rows": frame_rows,
        }))


if __name__ == "__main__":
    main()
