"""Named failures of a store, so callers can tell 'retry later' from 'never'."""


class StoreError(Exception):
    """A store operation failed for a reason retrying will not fix."""


class BlobNotFound(StoreError):
    """The key does not exist in the store."""

    def __init__(self, key: str) -> None:
        super().__init__(f"not found in store: {key}")
        self.key = key


class StoreUnavailable(StoreError):
    """Temporary: the store timed out, refused, or answered 5xx. Retrying may succeed."""


class BlobCorrupt(StoreError):
    """The bytes read do not match their key. Never served; a refetch may succeed."""


class ObjectTooLarge(BlobCorrupt):
    """The object is larger than any value of its kind can be: not read (a planted object
    must not make a reader allocate what it says)."""


def too_large(key: str, size: int, limit: int) -> ObjectTooLarge:
    return ObjectTooLarge(f"{key} is {size} bytes, over the {limit} that any object of its "
                          "kind can be: not read")
