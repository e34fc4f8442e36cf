"""slm chat: a conversation with a model.

On a terminal the input is read with prompt_toolkit (line editing, in-memory history, bracketed
paste, Esc+Enter for a new line); piped input is one message per line and stdout gets the replies
alone. Both share the commands (/help lists them) and the fitting of the history into the model's
context: when the conversation outgrows it, the oldest exchanges are dropped, the system prompt kept.
"""

from __future__ import annotations

import os
import re
import sys

from ..runtime.lm import LM
from .flags import model_flag, values
from .run import SAMPLING, check_run_args, sampling_flags

CHAT_MODEL = "smollm2-135m-instruct"  # runtime.models.DEFAULT_CHAT_MODEL, named here to keep --help fast

COMMANDS_HELP = """\
  Enter          send the message
  Esc, Enter     new line in the message (Alt+Enter too); a paste stays one message
  Up, Down       earlier messages of this session (kept in memory only)
  Ctrl-C         stop the reply (what it said so far stays in the conversation); at the prompt: clear the line
  Ctrl-D         quit
  /reset         forget the conversation (the system prompt stays)
  /system TEXT   set or replace the system prompt; /system alone removes it
  /save FILE     write the conversation as JSON (/save! FILE replaces an existing file)
  /help          this list
  /exit          quit"""

# Control characters that a terminal would act on (escape sequences, carriage return, bell), shown
# instead as ^[ and <U+009B>; a model's reply must not be able to drive the terminal.
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def visible(text: str) -> str:
    return CONTROL.sub(lambda m: f"^{chr(ord(m[0]) ^ 0x40)}" if m[0] < "\x80" else f"<U+{ord(m[0]):04X}>", text)


# "/word" or "/word!" alone or before a space: a command. "/usr/bin is ..." is a message.
COMMAND = re.compile(r"/([a-z]+!?)(?:\s+(.*))?", re.DOTALL)


def chat_flags(p) -> None:
    model_flag(p, default=CHAT_MODEL)
    p.add_argument("--system", default=None, help="system prompt (default: none; the model's template may add its own)")
    sampling_flags(p, LM.chat)


def load_options(a) -> dict:
    """The keyword arguments of slm.load that the flags give (load_flags): one place to pass a new one."""
    return {"dtype": a.dtype, "device": a.device, "quantize": a.quantize, "group_size": a.group_size,
            "tokenizer": a.tokenizer}


def chat(a) -> None:
    from .. import load
    from ..runtime.tokenizer import check_text
    if a.system is not None:
        check_text(a.system, "--system")
    check_run_args(a)
    lm = load(a.model, **load_options(a))
    if lm.tokenizer is None:
        raise ValueError(f"{a.model} has no tokenizer; chat needs a folder with tokenizer.json, or a .gguf file")
    session = Session(lm, a.max_new_tokens, values(a, SAMPLING), a.system or None, a.model,
                      interactive=sys.stdin.isatty())
    if session.interactive:
        ctx = lm.config.max_seq_len
        note(f"Chatting with {a.model} (context {ctx} tokens). Esc then Enter: new line; Ctrl-C: stop a reply; "
             f"Ctrl-D: quit; /help: commands.")
        lines = terminal_lines()
    else:
        lines = piped_lines()
    for line in lines:
        if not session.take(line):
            break


def note(text: str) -> None:
    """A line for the person at the terminal: on stderr, so that stdout holds the replies alone."""
    print(text, file=sys.stderr, flush=True)


class Session:
    """One conversation: the system prompt, the turns (user, assistant, user, ...) and the commands."""

    def __init__(self, lm, max_new_tokens: int, sampling: dict, system: str | None, model: str,
                 interactive: bool):
        self.lm, self.max_new_tokens, self.sampling = lm, max_new_tokens, sampling
        self.system, self.model, self.interactive = system, model, interactive
        self.turns: list[dict] = []
        self.show = visible if sys.stdout.isatty() else str  # piped stdout gets the text as it is

    def messages(self) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.turns

    def take(self, line: str) -> bool:
        """Act on one input: a command or a message. False: the session ends. On a terminal an
        error (a chat template that fails, text that is not UTF-8) is a line, and the session
        goes on; piped, it ends the session as the error of slm chat."""
        from . import describe
        try:
            m = COMMAND.fullmatch(line.strip())
            if m:
                return self.command(m.group(1), (m.group(2) or "").strip())
            if line.strip():
                self.reply(line.rstrip())
        except ValueError as e:
            if not self.interactive:
                raise
            note(f"slm chat: error: {describe(e)}")
        return True

    def command(self, name: str, arg: str) -> bool:
        from ..runtime.tokenizer import check_text
        if name in ("exit", "quit"):
            return False
        if name == "help":
            note(COMMANDS_HELP)
        elif name == "reset":
            self.turns = []
            note("(conversation cleared" + (", system prompt kept)" if self.system else ")"))
        elif name == "system":
            if arg:
                check_text(arg, "/system")
            self.system = arg or None
            note("(system prompt set)" if arg else "(system prompt removed)")
        elif name in ("save", "save!"):
            self.save(arg, replace=name == "save!")
        else:
            note(f"slm chat: unknown command /{name}; /help lists the commands")
        return True

    def save(self, path: str, replace: bool) -> None:
        from ..files import write_json
        from . import describe
        if not path:
            note("slm chat: /save needs a file name: /save FILE")
            return
        path = os.path.expanduser(path)
        if os.path.exists(path) and not replace:
            note(f"slm chat: {path} exists; /save! {path} replaces it")
            return
        try:
            write_json(path, {"model": self.model, "messages": self.messages()}, flag="/save")
        except (ValueError, OSError) as e:
            note(f"slm chat: error: {describe(e)}")
            return
        note(f"(saved {len(self.messages())} messages to {path})")

    def fit(self) -> list[int]:
        """The conversation's prompt tokens, after dropping the oldest exchanges (the system prompt
        stays) until the prompt and max_new_tokens fit the model's context; a ValueError when the
        last message alone leaves no room for a reply."""
        tokenizer, context = self.lm.tokenizer, self.lm.config.max_seq_len
        dropped = 0
        while True:
            ids = tokenizer.encode_chat(self.messages())
            if len(ids) + self.max_new_tokens <= context or len(self.turns) <= 1:
                break
            del self.turns[:2]  # the oldest message and its reply
            dropped += 1
        if dropped:
            note(f"slm chat: the conversation outgrew the context of {context} tokens; "
                 f"dropped the oldest {dropped} exchange{'s' if dropped > 1 else ''}")
        if len(ids) >= context:
            raise ValueError(f"the message is {len(ids)} tokens with the chat template and system prompt, "
                             f"and leaves no room in the context of {context}")
        return ids

    def reply(self, text: str) -> None:
        """Send one message and stream the reply to stdout. On a terminal Ctrl-C stops the reply:
        the part already shown stays in the conversation (a reply stopped before any text is
        dropped with its message)."""
        self.turns.append({"role": "user", "content": text})
        said: list[str] = []
        try:
            ids = self.fit()
            for chunk in self.lm.stream(ids, self.max_new_tokens, **self.sampling):
                said.append(chunk)
                sys.stdout.write(self.show(chunk))
                sys.stdout.flush()
        except ValueError:
            self.turns.pop()  # the message that could not be answered
            if said:
                sys.stdout.write("\n")
            raise
        except KeyboardInterrupt:
            if not self.interactive:
                raise
            sys.stdout.write("\n")
            note("(reply stopped)")
            if not said:
                self.turns.pop()
                return
        else:
            sys.stdout.write("\n")
        sys.stdout.flush()
        self.turns.append({"role": "assistant", "content": "".join(said)})


def piped_lines():
    """One message per line of standard input, until its end or an empty line."""
    while True:
        try:
            line = sys.stdin.readline()
        except KeyboardInterrupt:
            return
        except UnicodeDecodeError as e:
            raise ValueError(f"the input is not UTF-8 text ({e.reason} at byte {e.start} of the line)") from None
        if not line or not line.strip():
            return
        yield line.rstrip("\n")


def terminal_lines():
    """Messages typed at the terminal, with prompt_toolkit: line editing, history of this session
    (in memory), Esc+Enter (or Alt+Enter) for a new line, bracketed paste kept as one message.
    Ctrl-C clears the line being typed; Ctrl-D on an empty line ends the session."""
    from prompt_toolkit import PromptSession
    from prompt_toolkit.history import InMemoryHistory
    from prompt_toolkit.key_binding import KeyBindings
    from prompt_toolkit.output import create_output

    keys = KeyBindings()

    @keys.add("escape", "enter")
    def _newline(event):
        event.current_buffer.insert_text("\n")

    # the prompt is drawn on the terminal: stdout, or stderr when stdout is redirected
    prompt = PromptSession(history=InMemoryHistory(), key_bindings=keys, prompt_continuation="  ",
                           output=create_output(always_prefer_tty=True))
    while True:
        try:
            text = prompt.prompt("> ")
        except KeyboardInterrupt:
            continue
        except EOFError:
            print(file=sys.stderr, flush=True)
            return
        yield text
