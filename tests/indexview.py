"""The tree an index describes, in reference.py's terms, to compare with umoci's unpack."""

from __future__ import annotations

import stat
from collections import defaultdict

import blake3
from reference import _TYPES, EntryInfo, Tree

from blobstore import BlobStore, blob_key
from blobstore.envelope import decode
from indexer.format import Index, Inode


def _content_digest(index: Index, node: Inode, store: BlobStore) -> str:
    h = blake3.blake3()
    for key in index.chunks(node.ino):
        h.update(decode(store.get(blob_key(key)), key))
    return h.hexdigest()


def index_tree(index: Index, store: BlobStore) -> Tree:
    tree = Tree()
    by_ino: dict[int, list[bytes]] = defaultdict(list)
    digests: dict[int, str] = {}
    for path, node in index.walk():
        kind = _TYPES[stat.S_IFMT(node.mode)]
        digest = None
        if kind == "reg":
            if node.ino not in digests:
                digests[node.ino] = _content_digest(index, node, store)
            digest = digests[node.ino]
            by_ino[node.ino].append(path)
        tree.entries[path] = EntryInfo(
            type=kind,  # type: ignore[arg-type]
            mode=stat.S_IMODE(node.mode),
            uid=node.uid,
            gid=node.gid,
            size=node.size if kind == "reg" else 0,
            digest=digest,
            target=index.readlink(node.ino) if kind == "lnk" else None,
            rdev=node.rdev if kind in ("chr", "blk") else 0,
            xattrs=tuple(
                sorted((k.decode("utf-8", "surrogateescape"), v) for k, v in index.xattrs(node.ino))
            ),
            mtime_ns=None if kind == "dir" else node.mtime_ns,
        )
    tree.link_groups = {frozenset(paths) for paths in by_ino.values() if len(paths) > 1}
    return tree
