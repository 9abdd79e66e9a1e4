"""User-facing errors. The CLI prints these as one line and exits with status 2; anything else is a bug."""

from __future__ import annotations


class WeitiaoError(Exception):
    """An error caused by the user's input (config, data, paths), not by weitiao itself."""


class ConfigError(WeitiaoError):
    pass


class ModelLoadError(WeitiaoError):
    pass


class DataError(WeitiaoError):
    """Bad data, located as precisely as we can: file, record number (1-based) and field."""

    def __init__(self, message: str, path: str | None = None, record: int | None = None,
                 field: str | None = None, line: int | None = None):
        self.path, self.record, self.field, self.line, self.reason = path, record, field, line, message
        where = []
        if path is not None:
            where.append(str(path))
        if record is not None:
            where.append(f"record {record}" + (f" (line {line})" if line is not None else ""))
        elif line is not None:
            where.append(f"line {line}")
        if field is not None:
            where.append(f"field '{field}'")
        super().__init__(": ".join(where + [message]))
