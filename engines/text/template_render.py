"""Chat templates rendered with bounds in time and size: a model file's template is untrusted code.

Jinja's sandbox stops a template reaching Python internals, but not one that loops for hours
(nested `range(100000)` loops pass it) or builds gigabytes (`'x' * 10**9`, doubling a namespace
string). `render(source, context)`:

- stops after RENDER_SECONDS: a watchdog raises an exception in the rendering thread
  (`PyThreadState_SetAsyncExc`), which interrupts any loop of template code;
- stops output, and every value a template builds on the way (operators, filters, string
  methods, format widths, namespace assignments), past a size that grows with the input:
  OUTPUT_BASE characters plus 4 for each character of the conversation, so real long chats
  render in full.

Both end in TemplateError with a message that says which bound was hit. Callers render off the
event loop (engine threads, worker threads): a hostile template costs its own request at most
RENDER_SECONDS, never the daemon.
"""

from __future__ import annotations

import ctypes
import json
import operator
import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from functools import lru_cache, update_wrapper
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError
from jinja2.utils import Namespace

RENDER_SECONDS = 2.0
OUTPUT_BASE = 1 << 20  # characters
INPUT_FACTOR = 4
MAX_POWER_BITS = 1 << 16
_FORMAT_WIDTH = re.compile(r"\{[^{}]*:[^{}]*?(\d+)[^{}]*\}")
_PERCENT_WIDTH = re.compile(r"%[#0\- +]*(\d+|\*)?(?:\.(\d+|\*))?")
_bounds = threading.local()  # .limit: the current render's size bound, per thread
_fire_lock = threading.Lock()


class TemplateError(ValueError):
    """The chat template is unsafe or broken, or ran past its bounds."""


class _Timeout(BaseException):
    """Raised inside the rendering thread by the watchdog; template code cannot catch it."""


def _limit() -> int:
    return getattr(_bounds, "limit", OUTPUT_BASE)


def _too_large(what: str) -> TemplateError:
    return TemplateError(f"chat template output is too large ({what} past {_limit():,} characters)")


def weight(value: Any, _seen: dict[int, int] | None = None) -> int:
    """Characters a value stands for once written out; shared sub-lists count every time they
    appear (memoized by identity, so a structure that doubles itself is measured in linear time)."""
    seen = {} if _seen is None else _seen
    if isinstance(value, str):
        return len(value)
    if not isinstance(value, list | tuple | dict):  # a namespace is checked as its values are set
        return 1
    key = id(value)
    if key not in seen:
        seen[key] = 0  # a cycle counts once
        parts = [*value.keys(), *value.values()] if isinstance(value, dict) else value
        seen[key] = 2 + sum(weight(part, seen) for part in parts)
    return seen[key]


def _checked(value: Any, what: str) -> Any:
    if isinstance(value, str | list | tuple | dict) and weight(value) > _limit():
        raise _too_large(what)
    return value


class _BoundedNamespace(Namespace):
    """`namespace()`: the one mutable object a template has, so growth in a loop passes here."""

    def __setitem__(self, name: str, value: Any) -> None:
        super().__setitem__(name, _checked(value, f"namespace value {name!r}"))


def _int_args(args: tuple, kwargs: dict) -> Iterator[int]:
    for value in (*args, *kwargs.values()):
        if isinstance(value, int) and not isinstance(value, bool):
            yield value


def _estimate(name: str, subject: Any, args: tuple, kwargs: dict) -> int:
    """What a string operation would build, before it builds it (0 when unknown)."""
    if not isinstance(subject, str):
        return 0
    if name == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
        old, new = args[0], args[1]
        hits = len(subject) + 1 if not old else subject.count(old)
        return len(subject) + hits * max(0, len(new) - len(old))
    if name == "translate" and args and isinstance(args[0], dict):  # one character -> a long string
        longest = max((len(v) for v in args[0].values() if isinstance(v, str)), default=1)
        return len(subject) * longest
    if name == "indent":
        width = args[0] if args else kwargs.get("width", 4)
        width = len(width) if isinstance(width, str) else int(width) if isinstance(width, int) else 0
        return len(subject) + (subject.count("\n") + 1) * width
    return 0


def _precheck(name: str, subject: Any, args: tuple, kwargs: dict) -> None:
    limit = _limit()
    if any(n > limit for n in _int_args(args, kwargs)):
        raise _too_large(f"{name}() argument")
    if _estimate(name, subject, args, kwargs) > limit:
        raise _too_large(f"{name}() result")


def _guard(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """A filter with the size bound applied to its arguments and its result."""
    skip = 0 if getattr(fn, "jinja_pass_arg", None) is None else 1  # eval context / environment first

    def guarded(*args: Any, **kwargs: Any) -> Any:
        if len(args) > skip:
            subject, rest = args[skip], args[skip + 1 :]
            _precheck(name, subject, rest, kwargs)
            if name == "join" and not isinstance(subject, str):  # the separator multiplies the parts
                subject = list(subject)
                sep = rest[0] if rest else kwargs.get("d", "")
                parts = sum(weight(item) for item in subject)
                if parts + len(str(sep)) * max(0, len(subject) - 1) > _limit():
                    raise _too_large("join() result")
                args = (*args[:skip], subject, *rest)
        return _checked(fn(*args, **kwargs), f"{name}() result")

    return update_wrapper(guarded, fn)  # keeps jinja_pass_arg


class BoundedEnvironment(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**", "%"})

    def __init__(self) -> None:
        super().__init__(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        self.filters["tojson"] = lambda value, indent=None: json.dumps(
            value, ensure_ascii=False, indent=indent
        )
        self.filters = {name: _guard(name, fn) for name, fn in self.filters.items()}
        self.globals["raise_exception"] = _raise
        self.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        self.globals["namespace"] = _BoundedNamespace

    def call_binop(self, context: Any, op: str, left: Any, right: Any) -> Any:
        limit = _limit()
        if op == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, str | list | tuple) and isinstance(n, int) and len(seq) * n > limit:
                    raise _too_large("repetition")
            if isinstance(left, int) and isinstance(right, int):  # squaring in a loop: C time, no check
                if abs(left).bit_length() + abs(right).bit_length() > MAX_POWER_BITS:
                    raise _too_large("a product")
            return operator.mul(left, right)
        if op == "**":
            if isinstance(left, int) and isinstance(right, int) and right > 0:
                if right * max(1, abs(left).bit_length()) > MAX_POWER_BITS:
                    raise _too_large("power")
            return operator.pow(left, right)
        if isinstance(left, str):  # % formatting: no width or precision past the bound
            extra = list(right) if isinstance(right, tuple) else [right]
            for width, precision in _PERCENT_WIDTH.findall(left):
                for n in (width, precision):
                    if n.isdigit() and int(n) > limit:
                        raise _too_large("a % width")
            if "*" in left and any(n > limit for n in _int_args(tuple(extra), {})):
                raise _too_large("a % width")
            return _checked(operator.mod(left, right), "% formatting")
        return operator.mod(left, right)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        name = getattr(__obj, "__name__", "call")
        if __obj is not range:  # range keeps the sandbox's own bound (MAX_RANGE)
            _precheck(name, getattr(__obj, "__self__", None), args, kwargs)  # str.center(10**9), ...
        return _checked(super().call(__context, __obj, *args, **kwargs), f"{name}() result")

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        wrapper = super().wrap_str_format(value)
        if wrapper is None:
            return None
        if any(int(n) > _limit() for n in _FORMAT_WIDTH.findall(value.__self__)):
            raise _too_large("a format width")
        return lambda *args, **kwargs: _checked(wrapper(*args, **kwargs), "format() result")


def _raise(message: str) -> None:
    raise jinja2.TemplateError(message)


@lru_cache(maxsize=32)
def compile_template(source: str) -> jinja2.Template:
    return BoundedEnvironment().from_string(source)


@contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Raise TemplateError in this thread once `seconds` pass inside the block."""
    ident, armed = threading.get_ident(), [True]

    def fire() -> None:
        with _fire_lock:  # never after the block has ended: `armed` drops under the same lock
            if armed[0]:
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident), ctypes.py_object(_Timeout))

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    try:
        timer.start()
        try:
            yield
        finally:
            with _fire_lock:
                armed[0] = False
            timer.cancel()
    except _Timeout:
        raise TemplateError(f"chat template rendering exceeded its time limit of {seconds:g} s") from None


def render(source: str, context: dict[str, Any], seconds: float = RENDER_SECONDS) -> str:
    """The template's output for `context`, within the time and size bounds."""
    _bounds.limit = OUTPUT_BASE + INPUT_FACTOR * weight(context)
    try:
        with deadline(seconds):
            template = compile_template(source)
            parts, size = [], 0
            for chunk in template.generate(**context):
                size += len(chunk)
                if size > _bounds.limit:
                    raise _too_large("the rendered prompt")
                parts.append(chunk)
            return "".join(parts)
    except SecurityError as exc:
        raise TemplateError(f"chat template tried an unsafe operation: {exc}") from None
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(f"chat template does not compile: {exc}") from None
    except jinja2.TemplateError as exc:
        raise TemplateError(f"chat template error: {exc}") from None
    except RecursionError:
        raise TemplateError("chat template recursed too deeply") from None
    except MemoryError:  # e.g. a {% set %} block buffering a literal millions of times
        raise _too_large("what the template built") from None
    except TemplateError:
        raise
    except Exception as exc:  # the template's own bug ({{ 1 + 'a' }}): its model's fault, not ours
        raise TemplateError(f"chat template error: {type(exc).__name__}: {exc}") from None
    finally:
        del _bounds.limit
