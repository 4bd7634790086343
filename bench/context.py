"""What a scenario gets to work with: options, a workspace, shared images, stores, progress.

Images, their umoci unpacks and their indexes are built once per run, on first use, and
shared by the scenarios that need them. Stores are `file://` dirs, or prefixes in a bucket on
one S3 server (SeaweedFS, or moto with `--s3-server moto`; started on first use) with
`--store s3`, reached through the shaped link with `--link`. `store_label` names the store
a result came from, S3 server included, for its parameters.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

from bench import images
from bench.core import RunOptions
from bench.imagebuild import build_layout
from bench.images import Built
from bench.netshape import Netns, delay_proxy
from bench.services import S3, environment, free_port, start_s3
from bench.workspace import Workspace, raise_if_interrupted
from indexer.build import IndexResult

AWS_UNSET = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_REGION")


class Reporter(Protocol):
    def step(self, text: str) -> None: ...

    def log(self, text: str) -> None: ...


class QuietReporter:
    def step(self, text: str) -> None:
        pass

    def log(self, text: str) -> None:
        pass


@dataclass(frozen=True)
class Sizes:
    bigfile: int
    many_files: int
    model: int  # bytes of safetensors weights (model scenario)
    profile_files: int  # small files in a startup profile (pack scenario)

    @classmethod
    def for_run(cls, quick: bool) -> Sizes:
        if quick:
            return cls(64 << 20, 2_000, 96 << 20, 300)
        return cls(1 << 30, 100_000, 2 << 30, 2_000)


@dataclass(frozen=True)
class Indexed:
    ref: str
    store_url: str
    result: IndexResult


class Context:
    def __init__(self, opts: RunOptions, ws: Workspace, reporter: Reporter | None = None) -> None:
        self.opts = opts
        self.ws = ws
        self.reporter = reporter or QuietReporter()
        self.sizes = Sizes.for_run(opts.quick)
        self.stack = contextlib.ExitStack()
        ws.on_close(self.stack.close)
        self._built: dict[str, Built] = {}
        self._unpacked: dict[str, Path] = {}
        self._indexed: dict[tuple[str, str], Indexed] = {}
        self._s3: S3 | None = None
        self.netns: Netns | None = None  # set by bench.netshape.shaped_link with --link

    def step(self, text: str) -> None:
        raise_if_interrupted()
        self.reporter.step(text)

    def log(self, text: str) -> None:
        raise_if_interrupted()
        self.reporter.log(text)

    @property
    def repeat(self) -> int:
        return self.opts.repeat

    def timed(self, fn: Callable[[], object]) -> float:
        started = time.perf_counter()
        fn()
        return time.perf_counter() - started

    # -- images ----------------------------------------------------------------------------

    def built(self, name: str) -> Built:
        """An image by name (realistic, realistic-v2, bigfile, many-files), built once, in
        one shared layout (so v2 shares unchanged layer blobs with the realistic image)."""
        if name not in self._built:
            self.step(f"building image {name}")
            layers = self._layers(name)
            layout = self.ws.root / "images" / ("realistic" if "realistic" in name else name)
            info = build_layout(layout, name, layers, config=images.config_for(name))
            files = sum(1 for layer in layers for e in layer if e.kind == "file")
            self._built[name] = Built(
                layout,
                name,
                info.uncompressed_size,
                sum(info.layer_sizes),
                info.layer_digests,
                info.layer_sizes,
                files,
            )
            self.log(
                f"image {name}: {info.uncompressed_size / 1e6:.0f} MB in "
                f"{len(info.layer_digests)} layers, {files} files"
            )
        return self._built[name]

    def _layers(self, name: str) -> list[list[images.Entry]]:
        if name == "realistic":
            return images.realistic_layers(self.opts.quick)
        if name == "realistic-v2":
            return images.version2(images.realistic_layers(self.opts.quick))
        if name == "bigfile":
            return images.bigfile_layers(self.sizes.bigfile)
        if name == "many-files":
            return images.many_files_layers(self.sizes.many_files)
        raise KeyError(f"no image named {name!r}")

    def unpacked(self, name: str) -> Path:
        """The image's rootfs as `umoci unpack` makes it (made once)."""
        if name not in self._unpacked:
            built = self.built(name)
            self.step(f"umoci unpack {name}")
            self._unpacked[name] = images.umoci_unpack(built, self.ws.dir(f"unpack-{name}"))
        return self._unpacked[name]

    # -- stores ----------------------------------------------------------------------------

    def store_url(self, name: str, kind: str | None = None) -> str:
        """A fresh, empty store: `--store`'s kind unless `kind` says otherwise."""
        if (kind or self.opts.store) == "s3":
            return self.s3().store_url(f"{name}-{time.monotonic_ns()}")
        return f"file://{self.ws.dir(f'store-{name}')}"

    def store_label(self, store_url: str) -> str:
        """What a result records as its store: "file", or "s3 (SERVER)"."""
        if store_url.startswith("s3:"):
            return f"s3 ({self.opts.s3_server})"
        return store_url.split(":")[0]

    def s3(self) -> S3:
        if self._s3 is None:
            server = self.opts.s3_server
            self.step(f"starting the S3 server ({server})")
            workdir = self.ws.dir("s3")
            if self.netns is None:
                self._s3 = self.stack.enter_context(start_s3(workdir, server=server))
            else:
                ns = self.netns
                inner = self.stack.enter_context(start_s3(workdir, ns.ns_ip, ns.wrap, server))
                port = free_port()
                target = int(inner.endpoint.rsplit(":", 1)[1])
                self.stack.enter_context(delay_proxy(port, ns.ns_ip, target, ns.link.delay_ms))
                self._s3 = replace(inner, endpoint=f"http://127.0.0.1:{port}")
            self.stack.enter_context(environment(self._s3.environ(workdir), unset=AWS_UNSET))
        return self._s3

    def indexed(self, name: str, kind: str | None = None) -> Indexed:
        """The image indexed into a store of its own (once per image and store kind)."""
        key = (name, kind or self.opts.store)
        if key not in self._indexed:
            built = self.built(name)
            url = self.store_url(name, kind)
            self.step(f"cafs index {name}")
            result = images.index_into(built, url, f"bench/{name}:latest")
            self._indexed[key] = Indexed(f"bench/{name}:latest", url, result)
        return self._indexed[key]

    def cache_dir(self, name: str) -> Path:
        """A fresh, empty node cache."""
        return self.ws.dir(f"cache-{name}")
