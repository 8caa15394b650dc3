"""A restricted unpickler for third-party pickles (the tox-block tokenizer): data only, no code.

`pickle.load` runs whatever callables a pickle names (``os.system``, ``builtins.eval``, ...). This
unpickler resolves globals itself:

- a short allow-list of plain container / scalar types is resolved to the real type (calling
  those with pickled arguments only builds data, no bigger than the pickle's own data);
- ``int`` and ``bytes`` are resolved to a stand-in that can only be called without arguments
  (a defaultdict's factory: ``defaultdict(int)``): by REDUCE, ``bytes(10**12)`` would allocate a
  terabyte from a 30-byte pickle and ``int`` can parse huge texts, so building them from pickled
  arguments is refused (the pickle's own BININT/BINBYTES opcodes still give ints and bytes);
- modules that can run code, touch the system or reach arbitrary attributes (``os``, ``subprocess``,
  ``builtins`` beyond the allow-list, ``importlib``, ``operator``, ``functools``, ...) are refused
  with :class:`UnsafePickleError`;
- every other global (``keras_preprocessing.text.Tokenizer``, a numpy reconstructor, ...) becomes an
  inert :class:`StandIn` subclass named after it. Constructing one (NEWOBJ, REDUCE, INST/OBJ)
  records the arguments; BUILD stores the state (``obj.state``; a dict state is also readable as
  attributes: ``tokenizer.word_index``); nothing from the original library is imported or run.

What comes back is type-checked (``check_data``): only None, bool, int, float, complex, str,
bytes, bytearray, list, tuple, dict, set, frozenset, OrderedDict, defaultdict, the stand-ins and
the argument-less factories, all the way down; anything else is refused. Callers check the shape
they expect on top (scorer.read_tokenizer: the word index is a dict of str -> int).
"""

from __future__ import annotations

import builtins
import collections
import io
import os
import pickle
from typing import Any

from ..errors import FgdilpError

__all__ = ["StandIn", "UnsafePickleError", "SafeUnpickler", "NoArgsFactory", "check_data", "safe_load",
           "safe_loads"]


class UnsafePickleError(pickle.UnpicklingError, FgdilpError):
    """The pickle names a global that could execute code, or is otherwise refused."""


# (module, name) -> the real object. Only types whose construction from pickled data builds data.
_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("collections", "defaultdict"): collections.defaultdict,
}


class NoArgsFactory:
    """``int`` or ``bytes`` as a pickle may name them: a value (a defaultdict's default_factory)
    that gives 0 or b"" when called without arguments and refuses any argument (REDUCE)."""

    def __init__(self, typ: type):
        self.type = typ

    def __call__(self, *args, **kwargs):
        if args or kwargs:
            raise UnsafePickleError(f"refusing to construct builtins.{self.type.__name__} from pickled "
                                    "arguments (it could allocate any size from a tiny file)")
        return self.type()

    def __repr__(self):
        return f"<argument-less {self.type.__name__}>"


for _name in ("dict", "list", "tuple", "set", "frozenset", "str", "float", "bool", "complex"):
    _ALLOWED[("builtins", _name)] = getattr(builtins, _name)
for _name in ("int", "bytes"):
    _ALLOWED[("builtins", _name)] = NoArgsFactory(getattr(builtins, _name))
for _name in list(_ALLOWED):
    if _name[0] == "builtins":
        _ALLOWED[("__builtin__", _name[1])] = _ALLOWED[_name]         # protocol 0-2 spelling
del _name

# Top-level modules whose globals are refused outright (rather than stood in for): asking for one
# of these is a sign of a malicious or at least unexpected pickle, so it is an error, not data.
_REFUSED_MODULES = frozenset({
    "builtins", "__builtin__", "os", "posix", "nt", "posixpath", "ntpath", "subprocess", "sys",
    "shutil", "importlib", "imp", "runpy", "code", "codeop", "pty", "socket", "ctypes", "cffi",
    "marshal", "pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib", "types",
    "functools", "operator", "copyreg", "copy_reg", "codecs", "_codecs", "io", "_io", "pathlib",
    "tempfile", "glob", "webbrowser", "pdb", "bdb", "timeit", "platform", "multiprocessing",
    "concurrent", "threading", "_thread", "asyncio", "signal", "inspect", "ast", "gc", "weakref",
    "site", "sysconfig", "pkgutil", "zipimport", "http", "urllib", "ftplib", "smtplib",
    "telnetlib", "xmlrpc", "requests", "setuptools", "distutils", "pip", "_posixsubprocess",
    "pydoc", "trace", "cProfile", "profile",
})


class StandIn:
    """Inert placeholder for a class the pickle named. Subclasses carry the original name in
    ``__standin_module__`` / ``__standin_name__``; instances record what the pickle gave them:

    - ``args`` / ``kwargs``: constructor arguments (NEWOBJ, REDUCE, INST, OBJ);
    - ``state``: the BUILD state (``__setstate__``), usually the instance ``__dict__``;
    - ``items`` / ``list_items``: SETITEM(S) and APPEND(S) data, for pickled dict / list subclasses.

    Public keys of a dict ``state`` read as attributes (``obj.word_index``); nothing else is
    exposed and no attribute ever names real code.
    """

    __standin_module__ = ""
    __standin_name__ = ""

    def __new__(cls, *args, **kwargs):
        self = object.__new__(cls)
        object.__setattr__(self, "args", args)
        object.__setattr__(self, "kwargs", kwargs)
        object.__setattr__(self, "state", None)
        object.__setattr__(self, "items", {})
        object.__setattr__(self, "list_items", [])
        return self

    def __init__(self, *args, **kwargs):   # REDUCE calls cls(*args): __new__ already recorded them
        pass

    def __setstate__(self, state):
        object.__setattr__(self, "state", state)

    def __setitem__(self, key, value):
        self.items[key] = value

    def append(self, value):
        self.list_items.append(value)

    def extend(self, values):
        self.list_items.extend(values)

    def __getattr__(self, name):
        # only reached when normal lookup fails; never exposes dunder / private names
        if not name.startswith("_"):
            st = self.__dict__.get("state")
            if isinstance(st, tuple) and len(st) == 2 and isinstance(st[0], dict):
                st = st[0]                       # (state, slotstate) form
            if isinstance(st, dict) and name in st:
                return st[name]
        raise AttributeError(f"{type(self).__name__} stand-in has no attribute {name!r}")

    def __repr__(self):
        return f"<stand-in for {self.__standin_module__}.{self.__standin_name__}>"


class SafeUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` whose ``find_class`` never returns real code (see the module doc)."""

    def __init__(self, file, **kwargs):
        super().__init__(file, **kwargs)
        self._standins: dict[tuple[str, str], type] = {}

    def find_class(self, module: str, name: str):
        key = (module, name)
        if key in _ALLOWED:
            return _ALLOWED[key]
        top = module.split(".", 1)[0]
        if top in _REFUSED_MODULES or module in _REFUSED_MODULES:
            raise UnsafePickleError(f"refusing to unpickle global {module}.{name}: the pickle asks "
                                    "for code this loader never runs (a tampered or malicious file?)")
        cls = self._standins.get(key)
        if cls is None:
            cls = type(f"StandIn[{module}.{name}]", (StandIn,),
                       {"__standin_module__": module, "__standin_name__": name,
                        "__module__": __name__})
            self._standins[key] = cls
        return cls

    def persistent_load(self, pid):
        raise UnsafePickleError("refusing a pickle with persistent ids")


_ATOMS = frozenset({type(None), bool, int, float, complex, str, bytes, bytearray, NoArgsFactory})
_CONTAINERS = frozenset({list, tuple, dict, set, frozenset, collections.OrderedDict, collections.defaultdict})


def check_data(obj: object) -> object:
    """Return obj when it is data only (see the module doc), else raise UnsafePickleError. Each
    object is visited once (a pickle can share one object many times through its memo)."""
    seen: set[int] = set()
    todo = [obj]
    while todo:
        x = todo.pop()
        t = type(x)
        if t in _ATOMS:
            continue
        if id(x) in seen:
            continue
        seen.add(id(x))
        if t in _CONTAINERS:
            if t is collections.defaultdict and x.default_factory is not None:
                todo.append(x.default_factory)
            items = (x.keys(), x.values()) if isinstance(x, dict) else (x,)
            for part in items:
                if not set(map(type, part)) <= _ATOMS:          # the fast path (C loops) for plain data
                    todo.extend(v for v in part if type(v) not in _ATOMS)
        elif isinstance(x, StandIn):
            d = x.__dict__
            todo += [d["args"], d["kwargs"], d["state"], d["items"], d["list_items"]]
        elif isinstance(x, type) and (issubclass(x, StandIn) or x in _REAL_TYPES):
            continue                     # a stand-in class, or an allowed type used as a value
        else:
            raise UnsafePickleError(f"the pickle produced a {t.__module__}.{t.__qualname__}, which is not "
                                    "plain data")
    return obj


_REAL_TYPES = frozenset(v for v in _ALLOWED.values() if isinstance(v, type))


def safe_loads(data: bytes | bytearray | memoryview) -> object:
    # a buffered reader lets the C unpickler prefetch with peek(): ~1.7x faster than bare BytesIO
    return check_data(SafeUnpickler(io.BufferedReader(io.BytesIO(bytes(data)), 1 << 20)).load())


def safe_load(path_or_bytes: str | os.PathLike | bytes | bytearray | memoryview) -> object:
    """Unpickle a file path or the pickle's bytes with :class:`SafeUnpickler` (and check_data)."""
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        return safe_loads(path_or_bytes)
    with open(path_or_bytes, "rb", buffering=1 << 20) as fh:
        return check_data(SafeUnpickler(fh).load())
