"""A desktop chat window that embeds edge-ds in-process (Tkinter, in the standard library).

    python apps/desktop_chat.py [MODEL_DIR]        # no MODEL_DIR: the shipped default model

The logic lives in ChatController, apart from the widgets, so tests drive it without a display.
Every model call runs on one worker thread: loading, each reply streamed token by token, Stop
(TextStream.cancel()), the chat session whose cache is reused across turns. The controller
reports back through a callback with events; the window turns them into text on the Tk thread
(Tk widgets must only be touched by the thread that made them). Quitting while a reply is
streaming stops it, lets the worker thread end (edge-ds frees that thread's MLX streams as it
ends) and exits with status 0.

Only edge-ds's public API is used: edge_ds.load, LanguageModel.chat, ChatSession.send,
TextStream (iteration, .cancel(), .stats), EdgeDSError.
"""

from __future__ import annotations

import os
import queue
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import edge_ds


@dataclass
class Event:
    """What the worker reports: kind is one of loading, loaded, reply, chunk, done, notice, error."""

    kind: str
    text: str = ""
    data: dict = field(default_factory=dict)


def resident_bytes() -> int:
    """The process's resident memory now (Linux), or its peak (macOS: getrusage is all there is)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


class ChatController:
    """Loads a model and chats with it on one worker thread; `on_event` receives Events (from the
    worker thread: a UI must hand them to its own thread)."""

    def __init__(self, on_event: Callable[[Event], None], max_tokens: int = 256, temperature: float = 0.0):
        self.on_event = on_event
        self.options = {"max_tokens": max_tokens, "temperature": temperature}
        self.lm: Any = None
        self.session: Any = None
        self._stream: Any = None  # the reply being streamed, for stop()
        self._calls: queue.Queue = queue.Queue()
        self._worker = threading.Thread(target=self._run, name="edge-ds-desktop", daemon=True)
        self._worker.start()

    # --- called from the UI thread ------------------------------------------------------------
    def open(self, model_dir: str | None = None, system: str | None = None) -> None:
        self._calls.put(lambda: self._load(model_dir, system))

    def send(self, text: str) -> None:
        self._calls.put(lambda: self._reply(text))

    def stop(self) -> None:
        """Ends the reply being streamed at once (before its next token)."""
        stream = self._stream
        if stream is not None:
            stream.cancel()

    def reset(self) -> None:
        self._calls.put(lambda: self.session and self.session.reset())

    def close(self, timeout: float = 30.0) -> bool:
        """Stops any reply and ends the worker thread; True once it has ended."""
        self.stop()
        self._calls.put(None)
        self._worker.join(timeout)
        return not self._worker.is_alive()

    @property
    def busy(self) -> bool:
        return self._stream is not None or not self._calls.empty()

    # --- on the worker thread ------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            call = self._calls.get()
            if call is None:
                return
            try:
                call()
            except edge_ds.EdgeDSError as e:  # the user's input (a model dir, a prompt): say so in the window
                self.on_event(Event("error", str(e)))
            except Exception as e:  # a bug: still the window's to show, the app goes on
                self.on_event(Event("error", f"internal error: {type(e).__name__}: {e}"))

    def _load(self, model_dir: str | None, system: str | None) -> None:
        self.on_event(Event("loading", model_dir or "the shipped default model"))
        start = time.perf_counter()
        lm = edge_ds.load(model_dir)
        self.lm, self.session = lm, lm.chat(system)
        self.on_event(Event("loaded", lm.path.name, {
            "seconds": time.perf_counter() - start, "resident_bytes": resident_bytes(),
            "backend": lm.backend.name, "backend_reason": lm.backend_reason, "device": lm.backend.device,
            "context": lm.config.max_position_embeddings}))

    def _reply(self, text: str) -> None:
        if self.session is None:
            raise edge_ds.EdgeDSError("no model is loaded yet")
        dropped = self.session.dropped_turns
        stream = self.session.send(text, **self.options)
        if self.session.dropped_turns > dropped:
            self.on_event(Event("notice", "the conversation outgrew the context: its oldest turns were dropped"))
        self._stream = stream
        try:
            self.on_event(Event("reply"))
            for chunk in stream:
                self.on_event(Event("chunk", chunk))
        finally:
            self._stream = None
        st = stream.stats
        self.on_event(Event("done", stream.text, {
            "finish_reason": st.finish_reason, "prompt_tokens": st.prompt_tokens,
            "prefilled_tokens": st.prefilled_tokens, "prompt_tps": st.prompt_tps,
            "generation_tokens": st.generation_tokens, "generation_tps": st.generation_tps,
            "peak_memory_gb": st.peak_memory_gb, "resident_bytes": resident_bytes()}))


def describe(event: Event) -> str:
    """The status-line text for an event (shared by the window and its tests)."""
    d = event.data
    if event.kind == "loading":
        return f"Loading {event.text}..."
    if event.kind == "loaded":
        return (f"{event.text}: loaded in {d['seconds']:.1f} s, {d['resident_bytes'] / 1e6:.0f} MB resident, "
                f"{d['backend']} on {d['device']} ({d['backend_reason']}), context {d['context']} tokens")
    if event.kind == "done":
        return (f"{d['generation_tokens']} tokens, {d['prompt_tps']:.0f} tok/s prompt ({d['prefilled_tokens']} of "
                f"{d['prompt_tokens']} prefilled), {d['generation_tps']:.1f} tok/s generation, "
                f"peak {d['peak_memory_gb'] * 1e3:.0f} MB, {d['resident_bytes'] / 1e6:.0f} MB resident"
                + (" (stopped)" if d["finish_reason"] == "cancelled" else ""))
    return event.text


def main(argv: list[str]) -> int:  # pragma: no cover - needs a display; the controller is tested
    import tkinter as tk
    from tkinter import filedialog, scrolledtext

    events: queue.Queue[Event] = queue.Queue()
    controller = ChatController(events.put)
    root = tk.Tk()
    root.title("edge-ds chat")
    log = scrolledtext.ScrolledText(root, wrap="word", height=24, width=90, state="disabled")
    log.pack(fill="both", expand=True)
    entry = tk.Entry(root)
    entry.pack(fill="x")
    status = tk.Label(root, anchor="w", text="")
    status.pack(fill="x")
    bar = tk.Frame(root)
    bar.pack(fill="x")

    def write(text: str, tag: str | None = None) -> None:
        log.configure(state="normal")
        log.insert("end", text, tag)
        log.configure(state="disabled")
        log.see("end")

    def send(_event: Any = None) -> None:
        text = entry.get().strip()
        if text and not controller.busy:
            entry.delete(0, "end")
            write(f"\nYou: {text}\n", "user")
            controller.send(text)

    def open_dir() -> None:
        path = filedialog.askdirectory(title="A converted model directory")
        if path:
            controller.open(path)

    def quit_app() -> None:
        controller.close()
        root.destroy()

    for label, command in (("Send", send), ("Stop", controller.stop), ("New chat", controller.reset),
                           ("Open model...", open_dir), ("Quit", quit_app)):
        tk.Button(bar, text=label, command=command).pack(side="left")
    log.tag_configure("user", foreground="#1a4f8b")
    log.tag_configure("error", foreground="#b00020")
    entry.bind("<Return>", send)
    root.protocol("WM_DELETE_WINDOW", quit_app)

    def poll() -> None:
        while not events.empty():
            event = events.get()
            if event.kind == "reply":
                write("Model: ")
            elif event.kind == "chunk":
                write(event.text)
            elif event.kind == "error":
                write(f"\n[{event.text}]\n", "error")
            if event.kind != "chunk":
                status.configure(text=describe(event))
        root.after(30, poll)

    controller.open(argv[0] if argv else None)
    poll()
    root.mainloop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
