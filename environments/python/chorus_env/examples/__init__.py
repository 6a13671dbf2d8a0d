"""Example plugins: ``python -m chorus_env.examples.word_count --port 50051 --token T``."""
