"""Similar-image search and near-duplicate groups over the vectors `effnet embed` writes, on faiss.

    >>> index = Index.build(["photos.parquet"], "photos.index")      # INDEX_DIR on disk; kind chosen for size
    >>> hits = Index.load("photos.index").search(["query.jpg"], k=10)  # Arrow table: query, rank, path, score
    >>> groups = dedup("photos/")                                      # Arrow table: group, path, keep, ...

index.py holds `Index` (build/load/search/add, the auto kind choice, atomic writes); dedup.py groups
near-duplicates; command.py the click commands `effnet index`, `effnet search`, `effnet dedup`.
"""

from .dedup import DEFAULT_SIZE, DEFAULT_THRESHOLD, dedup
from .index import Index

__all__ = ["Index", "dedup", "DEFAULT_SIZE", "DEFAULT_THRESHOLD"]
