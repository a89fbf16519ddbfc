"""`instructune serve`: an OpenAI-compatible endpoint and a chat page for a model folder, an adapter or a recovered
diff (FastAPI + uvicorn; for production traffic, vLLM reads the same folders)."""

import argparse
import logging
import os

HELP = "serve a model: an OpenAI-compatible API (/v1) and a chat page (/)"

logger = logging.getLogger("instructune")


def main(argv: list[str]) -> int:
    from instructune.serve.app import Limits, is_loopback

    defaults = Limits()
    parser = argparse.ArgumentParser(prog="instructune serve", description="Serve a model over OpenAI's API "
                                     "(/v1/models, /v1/chat/completions, /v1/completions) with a chat page at /.")
    parser.add_argument("--model", "--model_name_or_path", dest="model", required=True, help="model folder, adapter folder, hub id or built-in name")
    parser.add_argument("--adapter", default=None, help="a LoRA adapter folder to merge into the model")
    parser.add_argument("--served_model_name", default=None, help="the name clients ask for (default: the folder's)")
    parser.add_argument("--prompt_template", default="auto", choices=("auto", "alpaca", "chat"),
                        help="auto: the one the model was trained with (its train_results.json), else alpaca")
    parser.add_argument("--host", default="127.0.0.1", help="127.0.0.1 (default): this machine only; 0.0.0.0: all")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api_key_env", default=None,
                        help="the environment variable holding the API key that clients must send as a Bearer token")
    parser.add_argument("--max_batch_size", type=int, default=defaults.max_batch_size,
                        help="requests in flight (decoded together)")
    parser.add_argument("--batching", default=defaults.batching, choices=("continuous", "static"),
                        help="continuous (default): a request joins the running ones at the next step; static: it "
                        "waits for the running batch to end (models with sliding-window caches always get static)")
    parser.add_argument("--max_tokens_limit", type=int, default=defaults.max_tokens,
                        help="the largest max_tokens a request may ask for")
    parser.add_argument("--max_request_bytes", type=int, default=defaults.max_request_bytes)
    parser.add_argument("--max_queue", type=int, default=defaults.max_queue,
                        help="requests in hand (waiting or running) before new ones get 429")
    parser.add_argument("--batch_wait_ms", type=float, default=defaults.batch_wait_ms,
                        help="static batches: how long a request that finds the model idle waits for others to "
                        "join its batch (continuous batching needs no wait: later requests join at the next step)")
    parser.add_argument("--shutdown_grace_s", type=float, default=30,
                        help="on SIGTERM or Ctrl-C: stop accepting, let requests in hand finish for this long, cancel "
                        "what is left, exit 0")
    args = parser.parse_args(argv)

    from instructune.errors import UserError

    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            raise UserError(f"--api_key_env {args.api_key_env}: that environment variable is empty or not set")
    loopback = is_loopback(args.host)
    if not loopback and not api_key:
        logger.warning("serving on %s without an API key: anyone who can reach this port can use the model", args.host)

    import signal

    import uvicorn

    from instructune.inference.engine import load
    from instructune.serve.app import create_app

    engine = load(args.model, args.adapter, args.prompt_template, args.served_model_name)
    limits = Limits(args.max_batch_size, args.max_tokens_limit, args.max_request_bytes, args.max_queue, args.batch_wait_ms,
                    api_key, loopback_only=loopback, batching=args.batching)
    app = create_app(engine, limits)
    logger.info("serving %s (%s template, context %d) on http://%s:%d: chat page at /, API at /v1", engine.name,
                engine.template, engine.context_length, args.host, args.port)
    # uvicorn drains on SIGTERM/SIGINT (stops accepting, waits up to the grace time, cancels the rest), then raises
    # the signal again with the handlers it found: these, so that a drained server exits 0.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: None)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=args.shutdown_grace_s)
    app.state.batcher.stop()
    logger.info("stopped: requests in hand were finished or cancelled")
    return 0
