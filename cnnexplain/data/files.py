"""The files a dataset names: confined to the dataset's root, and decoded within a pixel limit.

Every reader of image files (image folders, Broden, TCAV concept folders, saliency's image
files, ``data inspect``) follows two rules, set by a :class:`FilePolicy` (the options
``follow_symlinks`` and ``max_image_pixels``):

- a file or folder a dataset names must resolve (``Path.resolve``: symlinks followed) inside
  the dataset's root, so that a link planted in a dataset (``images/etc -> /etc``) cannot make
  a command read files elsewhere. ``follow_symlinks`` accepts datasets that are farms of links;
- an image is decoded only when its width x height, read from its header before any pixel is
  decoded, is at most ``max_pixels``: the guard against decompression bombs (a PNG of a few
  hundred kB can claim 30000 x 30000 pixels, 900 MB once decoded). The default is PIL's own
  warning threshold (``PIL.Image.MAX_IMAGE_PIXELS``, 89,478,485). PIL's guard is replaced by
  this one while a file is opened: its DecompressionBombWarning never reaches stderr, and its
  DecompressionBombError (raised over twice its threshold while the header is read) cannot
  fire before the one-line error that names the file, its size and the option.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from cnnexplain.config.common import FileOptions
from cnnexplain.errors import CnnexplainError

_DEFAULTS = FileOptions()
FOLLOW_FIX = "pass `follow_symlinks=true` if the dataset is a farm of links"


@dataclass(frozen=True)
class FilePolicy:
    """How dataset files are read: ``max_pixels`` (width x height) an image may have to be
    decoded; ``follow_symlinks``: accept files that resolve outside the dataset's root."""

    max_pixels: int = _DEFAULTS.max_image_pixels
    follow_symlinks: bool = _DEFAULTS.follow_symlinks

    @classmethod
    def of(cls, options: FileOptions | None) -> "FilePolicy":
        """The policy of a command's :class:`~cnnexplain.config.common.FileOptions` (None:
        the defaults)."""
        if options is None:
            return cls()
        return cls(int(options.max_image_pixels), bool(options.follow_symlinks))


DEFAULT = FilePolicy()


def _policy(policy: FilePolicy | None) -> FilePolicy:
    return DEFAULT if policy is None else policy


class Confinement:
    """:func:`inside` for many paths under one root: each directory is resolved once (a file
    then costs one ``lstat``), for datasets of many thousand files."""

    def __init__(self, root: str | os.PathLike, policy: FilePolicy | None = None):
        self.root = Path(root)
        self.policy = _policy(policy)
        self._real_root = None if self.policy.follow_symlinks else self.root.resolve()
        self._dirs: dict[Path, Path] = {}

    def real(self, path: Path) -> Path:
        """``path.resolve()``, with the parent's resolution cached."""
        if path.name in ("", ".", ".."):
            return path.resolve()
        parent = self._dirs.get(path.parent)
        if parent is None:
            parent = self._dirs[path.parent] = path.parent.resolve()
        real = parent / path.name
        return real.resolve() if real.is_symlink() else real

    def check(self, path: str | os.PathLike, what: str = "") -> Path:
        """``path`` itself when it resolves inside the root (or symlinks are followed), else a
        one-line CnnexplainError naming the file, where it leads, the root and the fix."""
        path = Path(path)
        if self._real_root is None:
            return path
        real = self.real(path)
        if real == self._real_root or real.is_relative_to(self._real_root):
            return path
        label = f"{what} {path}" if what else str(path)
        raise CnnexplainError(f"{label} resolves to {real}, outside the dataset root "
                              f"{self.root}", FOLLOW_FIX)


def inside(path: str | os.PathLike, root: str | os.PathLike,
           policy: FilePolicy | None = None, what: str = "") -> Path:
    """``path`` when it resolves (symlinks included) inside ``root``, or ``policy`` follows
    symlinks; else a one-line CnnexplainError naming the file, the root and the fix."""
    return Confinement(root, policy).check(path, what)


def too_large(path: str | os.PathLike, width: int, height: int, policy: FilePolicy | None,
              what: str = "image") -> CnnexplainError:
    """The one-line error for an image over the decoding limit."""
    limit = _policy(policy).max_pixels
    pixels = int(width) * int(height)
    return CnnexplainError(f"{what} {path} is {width}x{height} = {pixels} pixels, over the "
                           f"decoding limit of {limit} pixels (a guard against decompression "
                           "bombs)", f"pass `max_image_pixels={pixels}` to decode it if it is "
                           "genuine, or remove the file")


@contextlib.contextmanager
def open_image(path: str | os.PathLike, policy: FilePolicy | None = None,
               root: str | os.PathLike | Confinement | None = None,
               what: str = "image") -> Iterator:
    """``with open_image(path, policy, root) as im:`` a PIL image whose header is read and
    whose width x height is at most ``policy.max_pixels``; pixels are decoded by the caller
    inside the block. ``root``: ``path`` must resolve inside it (:func:`inside`; a
    :class:`Confinement` for a reader that opens many files under one root). One-line
    CnnexplainError for an escaping path or an image over the limit; PIL's own errors
    (OSError, ValueError, SyntaxError) propagate for the caller to word.

    PIL's global ``MAX_IMAGE_PIXELS`` is lifted while the header is read (restored in
    ``finally``), so that PIL's DecompressionBombError cannot pre-empt this check; while the
    caller decodes it is raised to ``max_pixels`` only when that is the larger (formats that
    check again while decoding, GIF frames or TIFF tiles, then accept what the option allows).
    DecompressionBombWarning and PIL's other warnings are silenced for the whole block."""
    from PIL import Image

    policy = _policy(policy)
    path = Path(path)
    if isinstance(root, Confinement):
        root.check(path, what)
    elif root is not None:
        inside(path, root, policy, what)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        warnings.filterwarnings("ignore", module=r"PIL(\.|$)")
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            im = Image.open(path)
        finally:
            Image.MAX_IMAGE_PIXELS = saved
        with im:
            width, height = im.size
            if width * height > policy.max_pixels:
                raise too_large(path, width, height, policy, what)
            lifted = saved is not None and policy.max_pixels > saved
            if lifted:
                Image.MAX_IMAGE_PIXELS = policy.max_pixels
            try:
                yield im
            finally:
                if lifted:
                    Image.MAX_IMAGE_PIXELS = saved
