"""guess_number: a multi-turn example. The model guesses a hidden number; after each wrong guess
it is told "higher" or "lower". Reward 1 for finding it within the allowed guesses.

Level 0 hides a number in 1-8, level 1 in 1-16, level 2 in 1-32; six guesses are always enough
for binary search, which is the reference policy. Serve it with
``python -m chorus_env.examples.guess_number --port 50052 --token T``.
"""

import random

import chorus_env


def _number(completion):
    answer = chorus_env.final_answer(chorus_env.response_text(completion))
    return int(answer) if answer.isdigit() else None


class GuessNumber(chorus_env.Environment):
    name = "guess_number"
    description = "Find a hidden number from higher/lower hints; multi-turn"
    category = "game"
    multi_turn = True
    max_turns = 6
    max_level = 2

    def sample(self, seed, split, level):
        top = 8 << min(level, self.max_level)
        rng = random.Random(f"{self.name}:{seed}:{level}")
        for _ in range(1000):
            secret, jar = rng.randint(1, top), rng.randint(1, 99)
            # Split by what the model sees (the jar), so no prompt is in both splits.
            if chorus_env.split_of(self.name, f"{top}:{jar}") == split:
                return chorus_env.Task(
                    task_id=f"guess_number-{split}-{level}-{jar}-{secret}",
                    prompt=f"Jar {jar} holds 1 to {top} beans. Guess how many; I say higher or lower.",
                    data={"secret": secret, "top": top},
                )
        raise ValueError(f"no {split} task for seed {seed}")

    def score(self, task, completion):
        guess, secret = _number(completion), task.data["secret"]
        if guess is None:
            return chorus_env.Score(0.0, "no number", {"format": 0.0})
        return chorus_env.Score(1.0 if guess == secret else 0.0,
                                f"guessed {guess}, it is {secret}", {"format": 1.0})

    def reference(self, task):
        return str(task.data["secret"])

    def wrong_completions(self, task):
        return [str(task.data["secret"] % task.data["top"] + 1)]

    def start(self, task):
        return {"lo": 1, "hi": task.data["top"]}

    def step(self, task, state, action, turn):
        guess, secret = _number(action), task.data["secret"]
        if guess is None:
            return chorus_env.StepResult(done=True, score=chorus_env.Score(0.0, "no number"), state=state)
        if guess == secret:
            return chorus_env.StepResult(
                done=True, score=chorus_env.Score(1.0, f"found {secret} in {turn + 1} guesses"), state=state)
        if turn + 1 >= self.max_turns:
            return chorus_env.StepResult(
                done=True, score=chorus_env.Score(0.0, f"out of guesses; it was {secret}"), state=state)
        if guess < secret:
            state = {"lo": max(state["lo"], guess + 1), "hi": state["hi"]}
            hint = "higher"
        else:
            state = {"lo": state["lo"], "hi": min(state["hi"], guess - 1)}
            hint = "lower"
        return chorus_env.StepResult(done=False, observation=hint, state=state)

    def reference_action(self, task, state, turn):
        return str((state["lo"] + state["hi"]) // 2)


def main(argv=None):
    chorus_env.main_for(GuessNumber, argv)


if __name__ == "__main__":
    main()
