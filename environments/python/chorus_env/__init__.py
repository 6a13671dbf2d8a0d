"""Chorus environments in Python.

Subclass :class:`Environment`, describe it with class attributes (or override ``describe``),
implement ``sample`` and ``score`` (and ``reference`` for SFT warm-up and self-checks;
``start``/``step`` for multi-turn episodes), then :func:`serve` it::

    import chorus_env

    class Echo(chorus_env.Environment):
        name = "echo"
        description = "repeat a word"

        def sample(self, seed, split, level):
            word = ["cat", "dog", "sun"][seed % 3]
            return chorus_env.Task(task_id=f"echo-{split}-{word}", prompt=f"Say {word}",
                                   data={"word": word})

        def score(self, task, completion):
            ok = chorus_env.response_text(completion) == task.data["word"]
            return chorus_env.Score(1.0 if ok else 0.0, "exact match" if ok else "different")

        def reference(self, task):
            return task.data["word"]

    chorus_env.serve(Echo(), port=50051, token="s3cret")
"""

from .env import (
    Environment,
    Score,
    StepResult,
    Task,
    final_answer,
    response_text,
    split_of,
)
from .server import Server, serve, main_for
from .tls import TlsFiles

__all__ = [
    "Environment",
    "Score",
    "Server",
    "StepResult",
    "Task",
    "TlsFiles",
    "final_answer",
    "main_for",
    "response_text",
    "serve",
    "split_of",
]
