"""Caches bounded by the bytes they hold, and :func:`clear_caches`.

Plans are cached by their reps (hashable, immutable values), so that a layer met again costs a
dictionary lookup. A cache bounded by its number of entries is not bounded in memory: an entry
keeps its key's reps alive, and a rep built by ``change_basis`` holds its dense ``Q`` (a
1024-dim rep: 8 MiB, more with the bases derived from it). :class:`ByteBoundedCache` evicts the
least recently used entries once the tensors its entries reach (keys and values, each storage
counted once per entry) exceed ``max_bytes``. An entry's size is measured when it is stored and
once more when the next entry arrives (by then its first use has added its device copies); an
entry larger than the whole budget is still kept, alone, until the next one arrives.

Every cache of equiproj whose entries can hold tensors of unbounded size is one of these, each with
its own budget ``EQUIPROJ_CACHE_BYTES`` (read at import, default 1 GiB), changeable per cache through
``max_bytes``; the few ``functools.lru_cache`` left hold tiny values (an irrep's commutant basis,
tables keyed by a bounded degree). :func:`clear_caches` empties them all: the memory a long-running
process with ever new reps can hand back.
"""

from __future__ import annotations

import functools
import os
import sys
import threading
import weakref
from collections import OrderedDict, namedtuple

import torch

__all__ = ["ByteBoundedCache", "bytes_cached", "tensor_bytes", "clear_caches", "CacheInfo", "DEFAULT_CACHE_BYTES"]


def _default_budget() -> int:
    raw = os.environ.get("EQUIPROJ_CACHE_BYTES", "").strip()
    if not raw:
        return 1 << 30
    try:
        value = int(float(raw))
    except ValueError:
        raise ValueError(f"EQUIPROJ_CACHE_BYTES must be a number of bytes, got {raw!r}") from None
    if value < 0:
        raise ValueError(f"EQUIPROJ_CACHE_BYTES must be >= 0, got {raw!r}")
    return value


#: the byte budget of each :class:`ByteBoundedCache` unless given (``EQUIPROJ_CACHE_BYTES``, default 1 GiB)
DEFAULT_CACHE_BYTES = _default_budget()

#: what ``cache_info()`` returns: functools' fields (``maxsize`` None: bounded by bytes) and the bytes
CacheInfo = namedtuple("CacheInfo", "hits misses maxsize currsize bytes max_bytes")

_CACHES: "weakref.WeakSet[ByteBoundedCache]" = weakref.WeakSet()
_SKIP = (type, type(sys), type(len), type(lambda: 0), str, bytes, int, float, complex, bool, type(None),
         torch.dtype, torch.device, threading.Lock().__class__)


def tensor_bytes(*objects, limit: int = 100_000) -> int:
    """The bytes of the tensor storages reachable from ``objects`` (through containers, dataclass and
    instance attributes, ``functools.partial`` arguments), each storage counted once; at most
    ``limit`` objects are visited (the rest is not counted)."""
    seen_objects, seen_storages, total = set(), set(), 0
    stack = list(objects)
    while stack and len(seen_objects) < limit:
        obj = stack.pop()
        if id(obj) in seen_objects or isinstance(obj, _SKIP):
            continue
        seen_objects.add(id(obj))
        if isinstance(obj, torch.Tensor):
            try:
                storage = obj.untyped_storage()
                key = (storage.data_ptr(), obj.device) if storage.data_ptr() else id(storage)
                if key not in seen_storages:
                    seen_storages.add(key)
                    total += storage.nbytes()
            except (RuntimeError, NotImplementedError):  # tensor subclasses without one storage
                total += obj.numel() * obj.element_size()
            continue
        if isinstance(obj, dict):
            stack.extend(obj.keys())
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack.extend(obj)
        elif isinstance(obj, functools.partial):
            stack.extend(obj.args)
            stack.extend(obj.keywords.values())
        else:
            attrs = getattr(obj, "__dict__", None)
            if attrs is not None:
                stack.extend(attrs.values())
            for name in getattr(type(obj), "__slots__", ()):
                if hasattr(obj, name):
                    stack.append(getattr(obj, name))
    return total


class ByteBoundedCache:
    """A least-recently-used mapping bounded by the bytes of the tensors its entries hold (see the module).

    ``get(key)`` returns the value or ``None`` (and marks it used); ``put(key, value)`` stores it and
    evicts the oldest entries beyond ``max_bytes``. Thread-safe. ``info()``: a :data:`CacheInfo`.
    """

    def __init__(self, name: str, max_bytes: int | None = None):
        self.name = name
        self.max_bytes = DEFAULT_CACHE_BYTES if max_bytes is None else int(max_bytes)
        self._data: OrderedDict = OrderedDict()  # key -> (value, bytes)
        self._bytes = 0
        self._lock = threading.RLock()
        self.hits = self.misses = 0
        _CACHES.add(self)

    def get(self, key, default=None):
        item = self._data.get(key)  # without the lock: single dict operations are atomic
        if item is None:
            self.misses += 1
            return default
        try:
            self._data.move_to_end(key)
        except KeyError:  # evicted meanwhile by another thread
            pass
        self.hits += 1
        return item[0]

    def put(self, key, value) -> None:
        with self._lock:
            if self._data:  # the newest entry has been used since it was stored: measure it again
                last = next(reversed(self._data))
                old_value, old_size = self._data[last]
                size = tensor_bytes(last, old_value)
                self._data[last] = (old_value, size)
                self._bytes += size - old_size
            if key in self._data:
                self._bytes -= self._data.pop(key)[1]
            size = tensor_bytes(key, value)
            self._data[key] = (value, size)
            self._bytes += size
            while self._bytes > self.max_bytes and len(self._data) > 1:
                _, (_, s) = self._data.popitem(last=False)
                self._bytes -= s

    def __contains__(self, key) -> bool:
        with self._lock:
            return key in self._data

    def __len__(self) -> int:
        return len(self._data)

    @property
    def bytes(self) -> int:
        """The bytes the entries held when last measured."""
        return self._bytes

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self._bytes = 0

    def info(self) -> CacheInfo:
        return CacheInfo(self.hits, self.misses, None, len(self._data), self._bytes, self.max_bytes)


_KEYWORDS = object()  # separates the positional from the keyword arguments in a key


def bytes_cached(name: str, max_bytes: int | None = None):
    """A decorator like ``functools.lru_cache`` (hashable arguments) over a
    :class:`ByteBoundedCache`; the wrapper has ``cache``, ``cache_clear()`` and ``cache_info()``."""

    def decorate(fn):
        cache = ByteBoundedCache(name, max_bytes)
        data = cache._data

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            # keyword arguments make a key of their own, as in functools.lru_cache (f(a) and f(a, b=1) differ)
            key = args if not kwargs else (*args, _KEYWORDS, *kwargs.items())
            item = data.get(key)  # the common case without the lock: a hit
            if item is not None:
                try:
                    data.move_to_end(key)
                except KeyError:  # evicted meanwhile by another thread
                    pass
                cache.hits += 1
                return item[0]
            value = fn(*args, **kwargs)
            cache.misses += 1
            cache.put(key, value)
            return value

        wrapper.cache = cache
        wrapper.cache_clear = cache.clear
        wrapper.cache_info = cache.info
        return wrapper

    return decorate


def clear_caches() -> None:
    """Empty every cache of equiproj: the byte-bounded plan caches and the ``functools.lru_cache``
    functions of its modules (decompositions, Clebsch-Gordan coefficients, kernel spaces, grids).
    Later calls rebuild what they need; nothing else changes.

    Example::

        >>> import equiproj
        >>> equiproj.clear_caches()
    """
    for cache in list(_CACHES):
        cache.clear()
    for name, module in list(sys.modules.items()):
        if module is None or not (name == "equiproj" or name.startswith("equiproj.")):
            continue
        for obj in list(vars(module).values()):
            clear = getattr(obj, "cache_clear", None)
            if callable(clear) and getattr(obj, "__module__", None) == name:
                clear()
