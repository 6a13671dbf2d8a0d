"""Chorus' judge: runs an environment's tests against model-written code that lives in another
process. Written by chorus' code environments; run by the sandbox as `python -I -B -c SOURCE`.

Why two processes: the judge knows the tests (and their expected values) and writes the
results; the solution is code a policy wrote while being rewarded for passing. They share no
memory, no namespace and no file descriptor that carries results, so nothing the solution does
inside its own process (patching builtins, walking frames or the garbage collector, reading
files, printing, exiting early, returning objects that claim equality) can change what the
judge reports. Values cross between the two as plain data (see `encode`) and are rebuilt on the
judge's side from built-in types, so every comparison runs the judge's own `==`.

stdin (read whole, then closed, before the solution starts): a JSON object
  nonce         marks the judge's result lines
  solution      "solution.py" (a file executed as one module whose top-level names tests call)
                or null (the working directory is a package root: tests import its modules)
  bind          names of the solution's module bound in the tests' namespace (solution mode)
  modules       names of modules tests may import from the solution's side (repository mode)
  setup         Python run once, on the judge's side, before the tests
  tests         [{"label", "source", "kind"}]: kind "statement" runs the source in the setup's
                namespace; kind "module" runs it as a module and then calls each test* function
  call_timeout  seconds one call into the solution may take
stdout: lines `NONCE KIND JSON`, KIND one of result ({"test", "ok", "error"}), error (the
solution never became callable; JSON a string) and done (the number of results), written to a
file descriptor only the judge holds.
"""

import builtins
import json
import os
import select
import signal
import struct
import subprocess
import sys
import time
import types

try:
    import ctypes
except ImportError:  # the judge still separates processes without it
    ctypes = None

CODEC = r'''
MAX_DEPTH = 100
MAX_MESSAGE = 64 << 20


def encode(value, depth=0):
    if depth > MAX_DEPTH:
        raise ValueError("the value is nested more than %d levels deep" % MAX_DEPTH)
    kind = type(value)
    if value is None or kind is bool or kind is str:
        return value
    if kind is int:
        return {"i": hex(value)}
    if kind is float:
        return {"f": value.hex()}
    if kind is complex:
        return {"c": [value.real.hex(), value.imag.hex()]}
    if kind is bytes:
        return {"b": value.hex()}
    if kind is bytearray:
        return {"ba": bytes(value).hex()}
    if kind is list:
        return [encode(v, depth + 1) for v in value]
    if kind is tuple:
        return {"t": [encode(v, depth + 1) for v in value]}
    if kind is set:
        return {"s": [encode(v, depth + 1) for v in value]}
    if kind is frozenset:
        return {"fs": [encode(v, depth + 1) for v in value]}
    if kind is dict:
        return {"d": [[encode(k, depth + 1), encode(v, depth + 1)] for k, v in value.items()]}
    if kind is range:
        return {"r": [hex(value.start), hex(value.stop), hex(value.step)]}
    raise TypeError(
        "a value of type %s cannot cross between the solution and the judge "
        "(None, bool, int, float, complex, str, bytes, list, tuple, set, dict and range can)"
        % kind.__name__
    )


def send(fd, message):
    data = json.dumps(message, separators=(",", ":")).encode()
    if len(data) > MAX_MESSAGE:
        raise ValueError("a message of %d bytes is over the %d-byte limit" % (len(data), MAX_MESSAGE))
    data = struct.pack(">I", len(data)) + data
    while data:
        data = data[os.write(fd, data):]
'''

SERVER = r'''
import importlib, json, os, struct, sys, traceback

requests_fd, replies_fd, solution = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]


def read_exactly(n):
    data = b""
    while len(data) < n:
        chunk = os.read(requests_fd, n - len(data))
        if not chunk:
            raise SystemExit(0)
        data += chunk
    return data


def describe(err):
    return (type(err).__name__ + ": " + str(err))[:300]


namespace = {"__name__": "__solution__"}
sys.path.insert(0, os.getcwd())
if solution != "-":
    try:
        with open(solution) as f:
            source = f.read()
        exec(compile(source, solution, "exec"), namespace)
    except BaseException as err:
        send(replies_fd, {"id": 0, "ready": False, "error": describe(err)})
        raise SystemExit(0)
    names = sorted(k for k, v in namespace.items() if callable(v) and not k.startswith("__"))
else:
    names = []
send(replies_fd, {"id": 0, "ready": True, "callables": names})
while True:
    (size,) = struct.unpack(">I", read_exactly(4))
    request = json.loads(read_exactly(size))
    try:
        if request["module"] is None:
            target = namespace[request["name"]]
        else:
            target = getattr(importlib.import_module(request["module"]), request["name"])
        args = [decode(a) for a in request["args"]]
        kwargs = {k: decode(v) for k, v in request["kwargs"]}
        reply = {"id": request["id"], "value": encode(target(*args, **kwargs))}
    except BaseException as err:
        reply = {"id": request["id"], "raised": type(err).__name__, "message": str(err)[:300]}
    send(replies_fd, reply)
'''

DECODE = r'''
def decode(data, depth=0):
    if depth > MAX_DEPTH:
        raise ValueError("the value is nested more than %d levels deep" % MAX_DEPTH)
    kind = type(data)
    if data is None or kind is bool or kind is str:
        return data
    if kind is list:
        return [decode(v, depth + 1) for v in data]
    if kind is not dict or len(data) != 1:
        raise TypeError("not an encoded value: %.80r" % (data,))
    ((tag, body),) = data.items()
    if tag == "i" and type(body) is str:
        return int(body, 16)
    if tag == "f" and type(body) is str:
        return float.fromhex(body)
    if tag == "c" and type(body) is list and len(body) == 2:
        return complex(float.fromhex(body[0]), float.fromhex(body[1]))
    if tag == "b" and type(body) is str:
        return bytes.fromhex(body)
    if tag == "ba" and type(body) is str:
        return bytearray.fromhex(body)
    if tag == "r" and type(body) is list and len(body) == 3:
        return range(int(body[0], 16), int(body[1], 16), int(body[2], 16))
    if type(body) is not list:
        raise TypeError("not an encoded value: %.80r" % (data,))
    if tag == "t":
        return tuple(decode(v, depth + 1) for v in body)
    if tag == "s":
        return set(decode(v, depth + 1) for v in body)
    if tag == "fs":
        return frozenset(decode(v, depth + 1) for v in body)
    if tag == "d":
        result = {}
        for pair in body:
            if type(pair) is not list or len(pair) != 2:
                raise TypeError("not an encoded dict entry: %.80r" % (pair,))
            result[decode(pair[0], depth + 1)] = decode(pair[1], depth + 1)
        return result
    raise TypeError("not an encoded value: %.80r" % (data,))
'''

exec(CODEC + DECODE)

class SolutionError(Exception):
    """An exception raised in the solution's process (its type is not a built-in one)."""


class SolutionGone(Exception):
    """The solution's process ended, or did not answer a call in time."""


def describe(err):
    text = type(err).__name__ + ": " + str(err)
    return text if len(text) <= 300 else text[:300] + "..."


class Solution:
    """The solution's process, started (again, after it died) on demand."""

    def __init__(self, config):
        self.solution = config["solution"] or "-"
        self.timeout = float(config["call_timeout"])
        self.process = None
        self.next_id = 1
        self.starts = 0
        self.callables = []

    def start(self):
        self.starts += 1
        requests_r, requests_w = os.pipe()
        replies_r, replies_w = os.pipe()
        source = CODEC + DECODE + SERVER
        self.process = subprocess.Popen(
            [sys.executable, "-I", "-B", "-c", source, str(requests_r), str(replies_w), self.solution],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            pass_fds=(requests_r, replies_w),
            start_new_session=True,
        )
        os.close(requests_r)
        os.close(replies_w)
        self.requests, self.replies = requests_w, replies_r
        ready = self.receive(0, "before it was ready")
        if not ready.get("ready"):
            self.stop()
            raise SolutionGone("the code does not run: " + str(ready.get("error")))
        self.callables = ready.get("callables") or []

    def stop(self):
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except OSError:
            pass
        self.process.wait()
        for fd in (self.requests, self.replies):
            try:
                os.close(fd)
            except OSError:
                pass
        self.process = None

    def read_exactly(self, n, deadline, what):
        data = b""
        while len(data) < n:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.replies], [], [], left)[0]:
                self.stop()
                raise SolutionGone("the solution took longer than %gs %s" % (self.timeout, what))
            chunk = os.read(self.replies, n - len(data))
            if not chunk:
                self.process.wait()
                status = self.process.returncode
                self.stop()
                raise SolutionGone("the solution's process ended (status %s) %s" % (status, what))
            data += chunk
        return data

    def receive(self, want_id, what):
        deadline = time.monotonic() + self.timeout
        while True:
            (size,) = struct.unpack(">I", self.read_exactly(4, deadline, what))
            if size > MAX_MESSAGE:
                self.stop()
                raise SolutionGone("the solution sent a %d-byte reply" % size)
            reply = json.loads(self.read_exactly(size, deadline, what))
            if type(reply) is dict and reply.get("id") == want_id:
                return reply

    def call(self, module, name, args, kwargs):
        payload = {
            "module": module,
            "name": name,
            "args": [encode(a) for a in args],
            "kwargs": [[k, encode(v)] for k, v in kwargs.items()],
        }
        if self.process is None:
            self.start()
        call_id = self.next_id
        self.next_id += 1
        payload["id"] = call_id
        try:
            send(self.requests, payload)
        except OSError:
            self.stop()
            raise SolutionGone("the solution's process ended before the call to %s" % name)
        reply = self.receive(call_id, "in a call to %s" % name)
        if "raised" in reply:
            kind, message = str(reply["raised"]), str(reply.get("message", ""))
            # A built-in exception arrives as itself, so tests can expect it by name; any other
            # (and the exiting ones, which are not Exceptions) as SolutionError.
            builtin = getattr(builtins, kind, None)
            if isinstance(builtin, type) and issubclass(builtin, Exception):
                raise builtin(message)
            raise SolutionError("%s: %s" % (kind, message))
        if "value" not in reply:
            raise SolutionError("the solution's reply holds no value")
        return decode(reply["value"])


class Remote:
    """A function of the solution, called from the judge's side."""

    def __init__(self, solution, module, name):
        self._solution, self._module, self._name = solution, module, name
        self.__name__ = name

    def __call__(self, *args, **kwargs):
        return self._solution.call(self._module, self._name, args, kwargs)

    def __repr__(self):
        return "<solution function %s>" % self._name


class RemoteModule(types.ModuleType):
    """A module of the solution's repository; its attributes are its functions."""

    def __init__(self, solution, name):
        super().__init__(name)
        self._solution = solution

    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return Remote(self._solution, self.__name__, attr)


def main():
    config = json.loads(sys.stdin.read())
    os.close(0)
    results = os.dup(1)
    os.dup2(2, 1)  # test code that prints cannot interleave with the results

    def emit(kind, value):
        line = config["nonce"] + " " + kind + " " + json.dumps(value) + "\n"
        os.write(results, line.encode())

    if ctypes is not None:
        try:
            # PR_SET_DUMPABLE 0: the solution (same uid) cannot open /proc/<judge>/{mem,fd,...}
            # nor attach to the judge.
            ctypes.CDLL(None, use_errno=True).prctl(4, 0, 0, 0, 0)
        except (OSError, AttributeError):
            pass
    solution = Solution(config)
    namespace = {"__name__": "__judge__"}
    if config["solution"] is not None:
        try:
            solution.start()
        except SolutionGone as err:
            emit("error", str(err))
            emit("done", 0)
            return
        for name in config["bind"]:
            if name not in solution.callables:
                emit("error", "the code defines no function " + name)
                emit("done", 0)
                return
            namespace[name] = Remote(solution, None, name)
    for name in config["modules"]:
        sys.modules[name] = RemoteModule(solution, name)
    try:
        exec(compile(config["setup"], "tests", "exec"), namespace)
    except BaseException as err:
        emit("error", "the test setup fails: " + describe(err))
        emit("done", 0)
        return
    count = 0
    for test in config["tests"]:
        label = test["label"]
        if test["kind"] == "statement":
            source = test["source"]
            cases = [(label, lambda source=source: exec(compile(source, "test", "exec"), namespace))]
        else:
            module = {"__name__": label}
            try:
                exec(compile(test["source"], label, "exec"), module)
            except BaseException as err:
                emit("result", {"test": label, "ok": False, "error": "import failed: " + describe(err)})
                count += 1
                continue
            cases = [
                ("%s.%s" % (label, name), value)
                for name, value in list(module.items())
                if name.startswith("test") and callable(value)
            ]
        for name, run in cases:
            try:
                run()
            except BaseException as err:
                emit("result", {"test": name, "ok": False, "error": describe(err)})
            else:
                emit("result", {"test": name, "ok": True, "error": ""})
            count += 1
    solution.stop()
    emit("done", count)


main()
