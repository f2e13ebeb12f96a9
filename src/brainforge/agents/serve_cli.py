"""`brainforge serve`: base model + adapter behind the OpenAI-compatible policy server.

Loads exactly as `ask` / `chat` do (the adapter's base model, the chat template saved with
the adapter) and records every call in the trace store, so what an agent did against the
served model can be inspected (`brainforge traces list`) or exported for agent SFT.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from brainforge.agents.store import DEFAULT_STORE  # stdlib only: cheap at CLI start


def serve(
    adapter: Optional[Path] = typer.Option(None, "--adapter", "-a", help="A run folder or adapter folder."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Base model (default: the adapter's base, or 'default')."),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to bind; anything but loopback exposes the model "
                             "to the network (use --api-key-env then)."),
    port: int = typer.Option(8000, "--port", help="Port (0 picks a free one).", min=0, max=65535),
    store: Path = typer.Option(DEFAULT_STORE, "--store", help="SQLite trace store every call is recorded in."),
    api_key_env: Optional[str] = typer.Option(None, "--api-key-env", help="Environment variable holding the API key "
                                           "clients must send as 'Authorization: Bearer KEY'."),
    dtype: str = typer.Option("auto", "--dtype", help="Weights dtype: auto, bfloat16, float16 or float32."),
    max_tokens: int = typer.Option(256, "--max-tokens", min=1, help="Completion cap (and default) per request."),
    max_batch_size: int = typer.Option(32, "--max-batch-size", min=1, help="Most sequences decoded together."),
) -> None:
    """Serve base model + adapter as an OpenAI-compatible API (POST /v1/chat/completions) until Ctrl-C."""
    from brainforge.agents.server import PolicyServer, read_api_key
    from brainforge.agents.store import TraceStore
    from brainforge.config import PolicyServerSettings
    from brainforge.data.templates import chat_format
    from brainforge.inference import load_chat_model

    settings = PolicyServerSettings(host=host, port=port, api_key_env=api_key_env, max_tokens=max_tokens,
                                    max_batch_size=max_batch_size, store=str(store))
    read_api_key(api_key_env)  # an unset key variable fails now, not after the model loads
    traces = TraceStore(store)
    chat = load_chat_model(adapter, model, dtype)
    name = _model_name(adapter, model)
    server = PolicyServer(chat.model, chat.tokenizer, chat_format("chatml", chat.tokenizer).template, settings, traces,
                          model_name=name)
    base_url = server.start()
    key = f"${api_key_env}"
    typer.echo(f"Serving {name} at {base_url} (calls recorded in {store}; Ctrl-C stops)\n")
    typer.echo(f"  curl {base_url}/chat/completions -H 'Content-Type: application/json' "
               + (f"-H \"Authorization: Bearer {key}\" " if api_key_env else "")
               + f"-d '{{\"model\": \"{name}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello\"}}]}}'\n")
    typer.echo("  from openai import OpenAI")
    typer.echo(f"  client = OpenAI(base_url=\"{base_url}\", api_key=" + (f"os.environ[\"{api_key_env}\"])" if api_key_env else "\"none\")"))
    typer.echo(f"  client.chat.completions.create(model=\"{name}\", messages=[{{\"role\": \"user\", \"content\": \"Hello\"}}])\n")
    try:
        while not server.wait(timeout=0.5):  # short waits: Ctrl-C is delivered between them
            pass
    except KeyboardInterrupt:
        typer.echo("stopping")
    finally:
        server.stop()
        traces.close()


def _model_name(adapter: Path | None, model: str | None) -> str:
    """What /v1/models lists: the run folder's name for an adapter, else the model."""
    if adapter is not None:
        folder = adapter.resolve()
        return folder.parent.name if folder.name == "adapter" else folder.name
    return model or "default"
