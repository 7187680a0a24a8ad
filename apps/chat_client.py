"""Terminal chat with an OpenAI-compatible server (`edge-ds serve`), standard library only.

    python apps/chat_client.py --url http://127.0.0.1:8080
    EDGE_DS_API_KEY=KEY python apps/chat_client.py      # a server started with --api-key

Replies stream in as they are generated; the whole conversation is sent each turn (the server
reuses its prompt cache for the part it has seen). /reset starts over, /exit (or Ctrl-D)
quits, Ctrl-C stops a reply.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from typing import Iterator, TextIO


class ChatError(Exception):
    """The server answered with an error."""


class Unreachable(ChatError):
    """No server answers at the URL."""


def base_url(url: str) -> str:
    """http://host:port from a URL given with or without a trailing /v1."""
    url = url.rstrip("/")
    return url[:-3] if url.endswith("/v1") else url


def stream_chat(url: str, messages: list[dict], *, api_key: str | None = None, **options) -> Iterator[str]:
    """Yields the reply's text pieces as the server streams them (options: max_tokens, temperature...);
    api_key is sent as `Authorization: Bearer` (a server started with --api-key needs it)."""
    body = json.dumps({"messages": messages, "stream": True, **options}).encode()
    headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(f"{base_url(url)}/v1/chat/completions", body, headers)
    try:
        response = urllib.request.urlopen(request)
    except urllib.error.HTTPError as e:
        raise ChatError(_error_message(e.read()) or f"HTTP {e.code}") from None
    except urllib.error.URLError as e:
        raise Unreachable(f"cannot reach {url} ({e.reason})") from None
    with response:
        for raw in response:  # server-sent events: "data: {...}" lines, blank lines between
            line = raw.decode("utf-8").strip()
            if not line.startswith("data:"):
                continue
            data = line[len("data:"):].strip()
            if data == "[DONE]":
                return
            event = json.loads(data)
            if "error" in event:
                raise ChatError(_error_message(data.encode()))
            for choice in event.get("choices", []):
                text = choice.get("delta", {}).get("content")
                if text:
                    yield text


def _error_message(raw: bytes) -> str:
    try:
        return json.loads(raw)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return raw.decode("utf-8", "replace").strip()


def _read_line(stdin: TextIO, stdout: TextIO) -> str:
    if stdin is sys.stdin and stdout is sys.stdout:
        return input(">> ")  # line editing on a terminal
    stdout.write(">> ")
    stdout.flush()
    line = stdin.readline()
    if not line:
        raise EOFError
    return line.rstrip("\n")


def chat_loop(url: str, options: dict, system: str | None = None, stdin: TextIO = sys.stdin,
              stdout: TextIO = sys.stdout, api_key: str | None = None) -> int:
    """Reads user lines from stdin and prints the streamed replies; returns an exit status."""
    history: list[dict] = [{"role": "system", "content": system}] if system else []
    messages = list(history)
    while True:
        try:
            text = _read_line(stdin, stdout)
        except (EOFError, KeyboardInterrupt):
            stdout.write("\n")
            return 0
        if text.strip() in ("/exit", "/quit"):
            return 0
        if text.strip() == "/reset":
            messages = list(history)
            stdout.write("(conversation reset)\n")
            continue
        if not text.strip():
            continue
        messages.append({"role": "user", "content": text})
        reply = ""
        pieces = stream_chat(url, messages, api_key=api_key, **options)
        try:
            for piece in pieces:
                reply += piece
                stdout.write(piece)
                stdout.flush()
        except KeyboardInterrupt:
            stdout.write(" [stopped]")
        except ChatError as e:
            stdout.write(f"\nerror: {e}\n")
            messages.pop()
            if isinstance(e, Unreachable):
                return 1
            continue
        finally:
            pieces.close()  # closes the connection, which stops the server's generation
        stdout.write("\n")
        messages.append({"role": "assistant", "content": reply})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Chat with an OpenAI-compatible server (edge-ds serve).")
    parser.add_argument("--url", default="http://127.0.0.1:8080", help="server address (default: %(default)s)")
    parser.add_argument("--system", default=None, help="system prompt")
    parser.add_argument("--max-tokens", type=int, default=256, help="tokens per reply at most (default: %(default)s)")
    parser.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (default: %(default)s)")
    parser.add_argument("--model", default=None, help="model name to send (the server answers with its model)")
    parser.add_argument("--api-key", default=os.environ.get("EDGE_DS_API_KEY"),
                        help="the server's API key (default: $EDGE_DS_API_KEY; a flag shows in the process list)")
    args = parser.parse_args(argv)
    options = {"max_tokens": args.max_tokens, "temperature": args.temperature}
    if args.model:
        options["model"] = args.model
    return chat_loop(args.url, options, args.system, api_key=args.api_key)


if __name__ == "__main__":
    sys.exit(main())
