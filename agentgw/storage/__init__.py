"""SQL storage: one engine per process, tables from SQLModel."""

from agentgw.storage.db import create_db, ensure_private_dir, in_thread, make_engine, select_one

__all__ = ["create_db", "ensure_private_dir", "in_thread", "make_engine", "select_one"]
