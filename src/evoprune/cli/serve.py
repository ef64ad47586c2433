"""``evoprune operator-server``: a local OpenAI-compatible chat server for Self-Pruner's LLM operator.

Owns the command (``add_parsers``). In the foreground until Ctrl-C: llama.cpp's server on the model's
``.gguf`` file (``--backend llama.cpp``, the default: it enforces the operator's JSON schema), or
``transformers serve`` on its de-quantized HF directory (``--backend transformers``: plain text only). It
prints the base URL and the model name to pass as ``--operator-url`` / ``--operator-model``. The
address (``--host``, ``--port``; 0: any free port) and ``--threads`` are checked before anything is
loaded; a server that fails to start is one line (its last log line) naming its full log.
"""
from __future__ import annotations

import sys
import time

from ..errors import UserError

__all__ = ["add_parsers"]


def cmd_operator_server(args) -> int:
    from ..models.loading import gguf_file, hf_dir_of_gguf
    from ..search.llm.server import check_listen, free_port, start_llama_cpp_server, start_local_server

    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads must be >= 1, got {args.threads}")
    check_listen(args.host, args.port)
    if args.port == 0:
        args.port = free_port(args.host)
    if not args.model.strip():
        raise UserError("--model must not be empty")
    if args.backend == "llama.cpp":
        gguf = gguf_file(args.model)
        if gguf is None:
            raise UserError(f"--backend llama.cpp serves a .gguf file or a built-in alias, got {args.model!r}")
        ctx = start_llama_cpp_server(gguf, args.port, host=args.host, alias=args.model, threads=args.threads)
    else:
        model_dir = hf_dir_of_gguf(args.model) if gguf_file(args.model) is not None else args.model
        ctx = start_local_server(model_dir, args.port, host=args.host)
    with ctx as srv:
        print(f"{srv.backend} {srv.version or ''} serving {args.model} at {srv.url}\n"
              f"  search with: --operator-url {srv.url} --operator-model {srv.model}\n"
              f"  (Ctrl-C stops it; server log: {srv.log_path})", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (a plain kill): the server stops on leaving the block
            print("stopping", file=sys.stderr)
    return 0


def add_parsers(sub) -> None:
    from ..search.llm.server import BACKENDS

    p = sub.add_parser("operator-server", help="serve a local chat model for --method self-pruner (foreground)")
    p.add_argument("--backend", default="llama.cpp", choices=BACKENDS,
                   help="llama.cpp (the .gguf as it is; enforces the JSON schema) | transformers (transformers serve "
                        "on the de-quantized model; plain text) (default: %(default)s)")
    p.add_argument("--model", default="smollm2-135m", help="built-in alias or .gguf file (transformers: also a local "
                   "HF directory) (default: %(default)s)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="port; 0: any free port (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="llama.cpp CPU threads (default: its own choice)")
    p.set_defaults(func=cmd_operator_server)
