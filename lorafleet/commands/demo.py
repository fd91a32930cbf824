"""`lorafleet demo`: the main job on the embedded default model."""

from __future__ import annotations

import typer

DEFAULT_PROMPT = "What is the capital of France?"


def register(app: typer.Typer) -> None:
    @app.command("demo")
    def demo(
        model: str = typer.Option("smollm2-135m", help="Model spec (see `lorafleet models`)."),
        prompt: str = typer.Option(DEFAULT_PROMPT, help="The question to answer."),
        max_new_tokens: int = typer.Option(32, min=1, max=512),
    ) -> None:
        """Load the embedded SmolLM2-135M-Instruct and answer a prompt with it."""
        import time

        from lorafleet.chat import answer

        t0 = time.perf_counter()
        reply = answer(model, prompt, max_new_tokens=max_new_tokens)
        typer.echo(f"model: {model}")
        typer.echo(f"prompt: {prompt}")
        typer.echo(f"answer: {reply}")
        typer.echo(f"({time.perf_counter() - t0:.1f} s)")
