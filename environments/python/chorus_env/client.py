"""A Python client of Chorus' orchestrator: launch runs, follow their events, read their
summaries and rollouts, as plain dicts (or a pandas DataFrame, when pandas is installed).

    from chorus_env.client import Client

    c = Client("http://127.0.0.1:7010", token="T")
    run = c.launch("configs/quickstart.toml", name="demo")
    for event in c.watch(run["run_id"]):
        print(event)
    print(c.summary(run["run_id"])["stages"])
    frame = c.rollouts_frame(run["run_id"], environment="arithmetic", limit=500)

The orchestrator serves launched runs when it runs as `chorus serve orchestrator --listen ADDR`
with a standing fleet of learners and workers (see Chorus' README).
"""

import json
import os
import uuid

from google.protobuf.json_format import MessageToDict

from ._proto import orchestrator_pb2, orchestrator_pb2_grpc
from .tls import TlsFiles

FINAL = {"succeeded", "failed", "cancelled"}


_INTEGERS = {"created_at_ms", "finished_at_ms", "learner_step", "policy_version", "learner_steps",
             "completion_tokens", "min_policy_version", "max_policy_version", "consumed_at_step",
             "stage", "sequence", "timestamp_ms", "first_step", "last_step", "trajectories",
             "tasks", "correct", "step", "eval_tasks", "eval_every", "redispatched_prompts"}


def _tidy(value, key=None):
    """Enums as Chorus writes them (RUN_STATUS_SUCCEEDED -> succeeded) and 64-bit integers as
    ints (protobuf's JSON form writes them as strings), at every depth."""
    if isinstance(value, dict):
        return {k: _tidy(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_tidy(v, key) for v in value]
    if isinstance(value, str):
        for prefix in ("RUN_STATUS_", "FINISH_REASON_"):
            if value.startswith(prefix):
                return value[len(prefix):].lower()
        if key in _INTEGERS and value.lstrip("-").isdigit():
            return int(value)
    return value


def _dict(message):
    return _tidy(MessageToDict(message, preserving_proto_field_name=True,
                               always_print_fields_with_no_presence=True))


class Client:
    """The orchestrator at `url` (`http://host:port`, or `https://host:port` for one serving
    TLS), with the run's shared `token` (default `$CHORUS_TOKEN`). `tls`
    (:class:`chorus_env.tls.TlsFiles`, default: the `CHORUS_TLS_*` environment variables) gives
    the CA to trust and the client certificate an orchestrator with mutual TLS asks for."""

    def __init__(self, url, token=None, timeout=30.0, tls=None):
        token = token or os.environ.get("CHORUS_TOKEN")
        if not token:
            raise ValueError("give the orchestrator's token: Client(url, token=...) or CHORUS_TOKEN")
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"`{url}` is not an orchestrator address; allowed: http://host:port "
                             "or https://host:port")
        self._channel = (tls or TlsFiles()).or_env().channel(
            url, options=[("grpc.max_receive_message_length", 4 << 20)])
        self._stub = orchestrator_pb2_grpc.OrchestratorStub(self._channel)
        self._metadata = [("authorization", f"Bearer {token}")]
        self.timeout = timeout

    def close(self):
        self._channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self.close()

    def launch(self, config, name="", eval_tasks=None, eval_every=None, request_id=None):
        """Launches a run from `config` (a TOML file's path, or TOML text) and returns it. The
        same `request_id` again returns the same run instead of a second one."""
        text = config
        if "\n" not in config and os.path.exists(config):
            with open(config) as f:
                text = f.read()
        req = orchestrator_pb2.LaunchRunRequest(
            request_id=request_id or str(uuid.uuid4()), name=name, config_toml=text)
        if eval_tasks is not None:
            req.eval_tasks = eval_tasks
        if eval_every is not None:
            req.eval_every = eval_every
        reply = self._stub.LaunchRun(req, metadata=self._metadata, timeout=self.timeout)
        run = _dict(reply.run)
        run["created"] = reply.created
        return run

    def run(self, run_id):
        """One run: id, name, status, step, version, times, config."""
        return _dict(self._stub.GetRun(orchestrator_pb2.GetRunRequest(run_id=run_id),
                                       metadata=self._metadata, timeout=self.timeout))

    def runs(self, limit=100):
        """Runs, newest first."""
        reply = self._stub.ListRuns(orchestrator_pb2.ListRunsRequest(limit=limit),
                                    metadata=self._metadata, timeout=self.timeout)
        return [_dict(r) for r in reply.runs]

    def watch(self, run_id, after_sequence=0):
        """The run's events as dicts (`kind` names the event), live until the run ends."""
        stream = self._stub.WatchRun(
            orchestrator_pb2.WatchRunRequest(run_id=run_id, after_sequence=after_sequence),
            metadata=self._metadata)
        for event in stream:
            d = _dict(event)
            d["kind"] = event.WhichOneof("kind")
            yield d

    def wait(self, run_id):
        """Follows the run to its end and returns it."""
        for _ in self.watch(run_id):
            pass
        return self.run(run_id)

    def summary(self, run_id):
        """The ledger's record of the run: the run, its stages (each stage's `summary` parsed
        from its summary.json) and its held-out evaluations."""
        reply = self._stub.GetRunSummary(orchestrator_pb2.GetRunRequest(run_id=run_id),
                                         metadata=self._metadata, timeout=self.timeout)
        d = _dict(reply)
        for stage in d.get("stages", []):
            text = stage.pop("summary_json", "")
            stage["summary"] = json.loads(text) if text else None
        return d

    def rollouts(self, run_id, environment="", min_reward=None, limit=100):
        """The run's trajectories, newest first, with their text, reward and versions."""
        req = orchestrator_pb2.ListRolloutsRequest(run_id=run_id, environment=environment,
                                                   limit=limit)
        if min_reward is not None:
            req.min_reward = min_reward
        reply = self._stub.ListRollouts(req, metadata=self._metadata, timeout=self.timeout)
        return [_dict(r) for r in reply.rollouts]

    def rollouts_frame(self, run_id, **filters):
        """`rollouts` as a pandas DataFrame (needs pandas)."""
        try:
            import pandas
        except ImportError as e:
            raise ImportError("rollouts_frame needs pandas: pip install pandas") from e
        return pandas.DataFrame(self.rollouts(run_id, **filters))
