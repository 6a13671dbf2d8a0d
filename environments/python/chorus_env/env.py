"""The environment contract in Python: tasks, scores and the base class to subclass."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

SPLITS = ("train", "heldout")
ROLES = ("system", "user", "assistant", "tool")


@dataclass
class Task:
    """One task. ``data`` is private to the environment (the answer, tests...): it travels to
    Chorus as JSON and comes back unchanged in every ``score``/``step`` call, and the model never
    sees it. ``messages`` (a list of ``{"role", "content"}``) replaces ``system_prompt`` and
    ``prompt`` when a prompt has several turns."""

    task_id: str
    prompt: str = ""
    data: Any = None
    system_prompt: str = ""
    messages: List[Dict[str, str]] = field(default_factory=list)
    # Filled in by the server from the Sample request when left as None.
    split: Optional[str] = None
    level: Optional[int] = None
    seed: Optional[int] = None
    # The environment's own [0, 1] difficulty estimate.
    difficulty: float = 0.0


@dataclass
class Score:
    """A verdict: a reward (1.0 = fully solved), a human-readable reason and named components
    (kept in order)."""

    reward: float
    reason: str = ""
    components: Dict[str, float] = field(default_factory=dict)


@dataclass
class StepResult:
    """What one step of a multi-turn episode returns. ``observation`` is what the model sees next
    (``None`` when the episode ends silently); ``score`` must be set exactly when ``done``;
    ``state`` is JSON-serialisable and comes back in the next ``step``."""

    done: bool
    observation: Optional[str] = None
    observation_role: str = "user"
    score: Optional[Score] = None
    state: Any = None


class Environment:
    """Subclass this. Class attributes describe the environment; override the methods.

    Sampling must be deterministic: the same ``(seed, split, level)`` gives the same task, and
    train and heldout tasks never share content (see :func:`split_of`). ``score`` must never
    raise on malformed model output: garbage scores 0 with a reason. Raising is for broken tasks;
    the run then fails only that trajectory.
    """

    name: str = ""
    description: str = ""
    #: One of Chorus' categories: math, long_context, logic, knowledge, instruction_following,
    #: structured_output, tool_use, planning, safety, game, ...
    category: str = "knowledge"
    multi_turn: bool = False
    max_turns: int = 1
    max_level: int = 0
    default_weight: float = 1.0
    version: str = ""

    def describe(self) -> Dict[str, Any]:
        """How the environment describes itself to Chorus (the Describe call). By default the
        class attributes; override to compute them (e.g. from a dataset)."""
        return {
            "name": self.name,
            "description": self.description,
            "category": self.category,
            "multi_turn": self.multi_turn,
            "max_turns": self.max_turns,
            "max_level": self.max_level,
            "default_weight": self.default_weight,
            "version": self.version,
        }

    def sample(self, seed: int, split: str, level: int) -> Task:
        raise NotImplementedError("sample(seed, split, level) must return a Task")

    def score(self, task: Task, completion: str) -> Score:
        raise NotImplementedError("score(task, completion) must return a Score")

    def reference(self, task: Task) -> Optional[str]:
        """A completion that earns the full reward (for SFT warm-up and self-checks), or None."""
        return None

    def wrong_completions(self, task: Task) -> List[str]:
        """Completions that must not earn the full reward (for Chorus' self-check)."""
        return []

    # Multi-turn episodes. The defaults make a one-step episode that scores the action.
    def start(self, task: Task) -> Any:
        """The state before the first step (JSON-serialisable)."""
        return None

    def step(self, task: Task, state: Any, action: str, turn: int) -> StepResult:
        return StepResult(done=True, score=self.score(task, action), state=state)

    def reference_action(self, task: Task, state: Any, turn: int) -> Optional[str]:
        """The reference policy's next action in an episode. Default: the reference."""
        return self.reference(task)


# Chorus' chat template markers (environments/src/chat.rs).
_STOPS = ("<|end|>", "</s>")


def response_text(completion: str) -> str:
    """The model's answer in a completion, as Chorus reads it: text after the first stop marker
    is dropped, a ``<think>...</think>`` block is removed, the rest is trimmed. An unterminated
    think block means no answer (empty string)."""
    ends = [completion.find(s) for s in _STOPS if s in completion]
    turn = completion[: min(ends)] if ends else completion
    close = turn.rfind("</think>")
    if close >= 0:
        return turn[close + len("</think>"):].strip()
    if "<think>" in turn:
        return ""
    return turn.strip()


def final_answer(response: str) -> str:
    """The final answer inside a response: the last ``\\boxed{...}``, else the last
    ``<answer>...</answer>``, else what follows the last ``####``, else the whole response."""
    boxed = re.findall(r"\\boxed\{([^{}]*)\}", response)
    if boxed:
        return boxed[-1].strip()
    tagged = re.findall(r"<answer>(.*?)(?:</answer>|$)", response, flags=re.S)
    if tagged:
        return tagged[-1].strip()
    if "####" in response:
        return response.rsplit("####", 1)[1].strip()
    return response.strip()


def split_of(name: str, content_key: str, heldout_one_in: int = 5) -> str:
    """``"train"`` or ``"heldout"`` by a hash of the task's content, so the same content is never
    in both splits."""
    digest = hashlib.sha256(f"{name}\0{content_key}".encode()).digest()
    return "heldout" if int.from_bytes(digest[:8], "little") % heldout_one_in == 0 else "train"
