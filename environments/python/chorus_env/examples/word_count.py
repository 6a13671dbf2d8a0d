"""word_count: how many words are in a short line? A tiny model learns it in minutes.

Level 0 asks about 1-4 words from a small vocabulary; each level adds up to two more words.
Serve it with ``python -m chorus_env.examples.word_count --port 50051 --token T``.
"""

import random

import chorus_env

WORDS = ["cat", "dog", "sun", "red", "sky", "box", "tea", "map", "owl", "pen", "ice", "fig"]


class WordCount(chorus_env.Environment):
    name = "word_count"
    description = "Count the words in a short line; exact integer answer"
    category = "knowledge"
    max_level = 3

    def sample(self, seed, split, level):
        level = min(level, self.max_level)
        rng = random.Random(f"{self.name}:{seed}:{level}")
        # Draw until the line falls in the requested split (the split is a hash of the line).
        for _ in range(1000):
            n = rng.randint(1, 4 + 2 * level)
            line = " ".join(rng.choice(WORDS) for _ in range(n))
            if chorus_env.split_of(self.name, line) == split:
                return chorus_env.Task(
                    task_id=f"word_count-{split}-{level}-{line.replace(' ', '_')}",
                    prompt=f"words: {line}",
                    data={"answer": n},
                )
        raise ValueError(f"no {split} task found for seed {seed}")

    def score(self, task, completion):
        answer = chorus_env.final_answer(chorus_env.response_text(completion))
        expected = task.data["answer"]
        if not answer:
            return chorus_env.Score(0.0, "empty answer", {"format": 0.0})
        if answer == str(expected):
            return chorus_env.Score(1.0, f"{answer} is right", {"format": 1.0})
        return chorus_env.Score(0.0, f"{answer!r} is not {expected}", {"format": 1.0 if answer.isdigit() else 0.0})

    def reference(self, task):
        return str(task.data["answer"])

    def wrong_completions(self, task):
        return [str(task.data["answer"] + 1), "many"]


def main(argv=None):
    chorus_env.main_for(WordCount, argv)


if __name__ == "__main__":
    main()
