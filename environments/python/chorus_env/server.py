"""serve(): an Environment behind Chorus' gRPC Environment service, checking the shared token."""

from __future__ import annotations

import argparse
import hmac
import json
import math
import os
import sys
import traceback
from concurrent import futures
from typing import Any, Callable, Optional

import grpc

from ._proto import common_pb2, environment_pb2, environment_pb2_grpc
from .env import ROLES, Environment, Score, StepResult, Task
from .tls import TlsFiles, add_port
from .tls import add_arguments as add_tls_arguments
from .tls import from_arguments as tls_from_arguments

_SPLIT_TO_WIRE = {"train": common_pb2.SPLIT_TRAIN, "heldout": common_pb2.SPLIT_HELDOUT}
_SPLIT_FROM_WIRE = {v: k for k, v in _SPLIT_TO_WIRE.items()}


class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def _task_to_wire(env: Environment, task: Task) -> environment_pb2.Task:
    if not isinstance(task, Task):
        raise _Abort(grpc.StatusCode.INTERNAL, f"sample() returned {type(task).__name__}, not a chorus_env.Task")
    if task.split not in _SPLIT_TO_WIRE:
        raise _Abort(grpc.StatusCode.INTERNAL, f"task {task.task_id}: split {task.split!r}; allowed: train, heldout")
    for m in task.messages:
        if m.get("role") not in ROLES:
            raise _Abort(grpc.StatusCode.INTERNAL, f"task {task.task_id}: role {m.get('role')!r}; allowed: {', '.join(ROLES)}")
    return environment_pb2.Task(
        environment=env.name,
        task_id=task.task_id,
        split=_SPLIT_TO_WIRE[task.split],
        system_prompt=task.system_prompt,
        prompt=task.prompt,
        task_json=json.dumps(task.data),
        difficulty=float(task.difficulty),
        level=int(task.level or 0),
        seed=int(task.seed or 0),
        messages=[environment_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in task.messages],
    )


def _task_from_wire(wire: environment_pb2.Task) -> Task:
    try:
        data = json.loads(wire.task_json) if wire.task_json else None
    except ValueError as e:
        raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"task {wire.task_id}: task_json is not JSON: {e}")
    if wire.split not in _SPLIT_FROM_WIRE:
        raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"task {wire.task_id}: split {wire.split} is not SPLIT_TRAIN or SPLIT_HELDOUT")
    return Task(
        task_id=wire.task_id,
        prompt=wire.prompt,
        data=data,
        system_prompt=wire.system_prompt,
        messages=[{"role": m.role, "content": m.content} for m in wire.messages],
        split=_SPLIT_FROM_WIRE[wire.split],
        level=wire.level,
        seed=wire.seed,
        difficulty=wire.difficulty,
    )


def _check_score(score: Any, what: str) -> Score:
    if not isinstance(score, Score):
        raise _Abort(grpc.StatusCode.INTERNAL, f"{what} returned {type(score).__name__}, not a chorus_env.Score")
    if not math.isfinite(float(score.reward)):
        raise _Abort(grpc.StatusCode.INTERNAL, f"{what} returned reward {score.reward}, not a finite number")
    return score


def _components(score: Score):
    items = [(str(k), float(v)) for k, v in score.components.items()]
    return dict(items), [environment_pb2.RewardComponent(name=k, value=v) for k, v in items]


def _state_from_wire(env: Environment, task: Task, state_json: str) -> Any:
    if not state_json:
        return env.start(task)
    try:
        return json.loads(state_json)
    except ValueError as e:
        raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"state_json is not JSON: {e}")


class _Servicer(environment_pb2_grpc.EnvironmentServicer):
    def __init__(self, env: Environment):
        self.env = env

    def _run(self, context, fn: Callable[[], Any]):
        try:
            return fn()
        except _Abort as e:
            context.abort(e.code, e.message)
        except NotImplementedError as e:
            context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{self.env.name}: {e or 'not implemented'}")
        except Exception as e:  # the environment's own failure fails only this call
            traceback.print_exc(file=sys.stderr)
            context.abort(grpc.StatusCode.INTERNAL, f"{self.env.name}: {type(e).__name__}: {e}")

    def Describe(self, request, context):
        def run():
            d = self.env.describe()
            return environment_pb2.DescribeResponse(
                name=str(d["name"]),
                version=str(d.get("version", "")),
                description=str(d.get("description", "")),
                multi_turn=bool(d.get("multi_turn", False)),
                max_turns=int(d.get("max_turns", 1)),
                category=str(d.get("category", "")),
                max_level=int(d.get("max_level", 0)),
                default_weight=float(d.get("default_weight", 1.0)),
            )

        return self._run(context, run)

    def Sample(self, request, context):
        def run():
            split = _SPLIT_FROM_WIRE.get(request.split)
            if split is None:
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"split {request.split} is not SPLIT_TRAIN or SPLIT_HELDOUT")
            if request.HasField("level"):
                level = request.level
            elif request.HasField("difficulty"):
                max_level = int(self.env.describe().get("max_level", 0))
                level = round(min(max(request.difficulty, 0.0), 1.0) * max_level)
            else:
                level = 0
            task = self.env.sample(request.seed, split, level)
            if isinstance(task, Task):
                task.split = split if task.split is None else task.split
                task.level = level if task.level is None else task.level
                task.seed = request.seed if task.seed is None else task.seed
            return environment_pb2.SampleResponse(task=_task_to_wire(self.env, task))

        return self._run(context, run)

    def Score(self, request, context):
        def run():
            task = _task_from_wire(request.task)
            score = _check_score(self.env.score(task, request.completion), "score()")
            components, ordered = _components(score)
            return environment_pb2.ScoreResponse(
                reward=float(score.reward), components=components, reason=score.reason,
                ordered_components=ordered)

        return self._run(context, run)

    def Step(self, request, context):
        def run():
            task = _task_from_wire(request.task)
            state = _state_from_wire(self.env, task, request.state_json)
            result = self.env.step(task, state, request.action, request.turn)
            if not isinstance(result, StepResult):
                raise _Abort(grpc.StatusCode.INTERNAL, f"step() returned {type(result).__name__}, not a chorus_env.StepResult")
            response = environment_pb2.StepResponse(done=result.done, state_json=json.dumps(result.state))
            if result.observation is not None:
                if result.observation_role not in ROLES:
                    raise _Abort(grpc.StatusCode.INTERNAL, f"observation_role {result.observation_role!r}; allowed: {', '.join(ROLES)}")
                response.observation = result.observation
                response.observation_role = result.observation_role
            if result.done:
                if result.score is None:
                    raise _Abort(grpc.StatusCode.INTERNAL, "step() ended the episode without a score")
                score = _check_score(result.score, "step()")
                components, ordered = _components(score)
                response.reward = float(score.reward)
                response.reward_components.update(components)
                response.ordered_components.extend(ordered)
                response.reason = score.reason
            return response

        return self._run(context, run)

    def Reference(self, request, context):
        def run():
            task = _task_from_wire(request.task)
            if request.in_episode:
                state = _state_from_wire(self.env, task, request.state_json)
                completion = self.env.reference_action(task, state, request.turn)
            else:
                completion = self.env.reference(task)
            if completion is None:
                raise _Abort(grpc.StatusCode.FAILED_PRECONDITION, f"{self.env.name} has no reference solution for task {task.task_id}")
            return environment_pb2.ReferenceResponse(completion=completion)

        return self._run(context, run)

    def WrongCompletions(self, request, context):
        def run():
            task = _task_from_wire(request.task)
            return environment_pb2.WrongCompletionsResponse(completions=list(self.env.wrong_completions(task)))

        return self._run(context, run)

    def Start(self, request, context):
        def run():
            task = _task_from_wire(request.task)
            return environment_pb2.StartResponse(state_json=json.dumps(self.env.start(task)))

        return self._run(context, run)


class _RequireToken(grpc.ServerInterceptor):
    """Admits only calls carrying ``authorization: Bearer <token>``, like Chorus' services."""

    def __init__(self, token: str):
        self._expected = f"Bearer {token}".encode()

    def intercept_service(self, continuation, handler_call_details):
        presented = dict(handler_call_details.invocation_metadata or ()).get("authorization", "")
        if hmac.compare_digest(presented.encode(), self._expected):
            return continuation(handler_call_details)

        def deny(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "invalid or missing token")

        return grpc.unary_unary_rpc_method_handler(deny)


class Server:
    """A running environment server."""

    def __init__(self, grpc_server: grpc.Server, host: str, port: int, scheme: str = "http"):
        self.grpc_server = grpc_server
        self.host = host
        self.port = port
        self.scheme = scheme

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    def wait(self) -> None:
        self.grpc_server.wait_for_termination()

    def stop(self, grace: Optional[float] = None) -> None:
        self.grpc_server.stop(grace)


# Chorus' limit on an Environment message (`chorus_proto::limits::ENVIRONMENT_MAX_MESSAGE_BYTES`):
# a larger request is refused by gRPC before it reaches the environment.
MAX_MESSAGE_BYTES = 64 << 20


def serve(env: Environment, port: int = 0, token: Optional[str] = None, host: str = "127.0.0.1",
          max_workers: int = 8, block: bool = True, tls: Optional[TlsFiles] = None) -> Server:
    """Serves ``env`` on ``host:port`` (port 0 picks a free one) and prints
    ``listening on URL``. Every call must carry ``token`` (default: the ``CHORUS_TOKEN``
    environment variable), the plugin token the run was given. With ``tls`` (default: the
    ``CHORUS_TLS_*`` environment variables) holding a certificate and key it serves TLS at
    ``https://host:port``, and with a CA too, mutual TLS (see :mod:`chorus_env.tls`). Messages
    over 64 MiB are refused. With ``block`` (the default) it serves until interrupted; otherwise
    it returns the running :class:`Server`."""
    if not isinstance(env, Environment):
        raise TypeError(f"serve() needs a chorus_env.Environment, got {type(env).__name__}")
    if not env.describe().get("name"):
        raise ValueError("the environment needs a name (set the class attribute `name`)")
    token = token if token is not None else os.environ.get("CHORUS_TOKEN")
    if not token:
        raise ValueError("give the run's shared token: serve(env, token=...) or CHORUS_TOKEN")
    if any(not (33 <= ord(c) <= 126) for c in token):
        raise ValueError("the token must be visible ASCII without spaces")
    tls = (tls or TlsFiles()).or_env()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers),
                         interceptors=[_RequireToken(token)],
                         options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                                  ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)])
    environment_pb2_grpc.add_EnvironmentServicer_to_server(_Servicer(env), server)
    bound, scheme = add_port(server, f"{host}:{port}", tls)
    if bound == 0:
        raise OSError(f"cannot listen on {host}:{port}")
    server.start()
    running = Server(server, host, bound, scheme)
    print(f"listening on {running.url}", flush=True)
    if block:
        try:
            running.wait()
        except KeyboardInterrupt:
            running.stop(0)
    return running


def main_for(make_env: Callable[[], Environment], argv=None) -> None:
    """A command line for a plugin: ``--host``, ``--port``, ``--token`` (or CHORUS_TOKEN) and
    the TLS flags of :func:`chorus_env.tls.add_arguments`."""
    env = make_env()
    parser = argparse.ArgumentParser(description=f"Serve the `{env.name}` environment to Chorus runs over gRPC.")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="port (default 0: a free port, printed on start)")
    parser.add_argument("--token", default=None, help="the run's shared token (default: $CHORUS_TOKEN)")
    add_tls_arguments(parser)
    args = parser.parse_args(argv)
    try:
        serve(env, port=args.port, token=args.token, host=args.host, tls=tls_from_arguments(args))
    except ValueError as e:
        parser.error(str(e))
