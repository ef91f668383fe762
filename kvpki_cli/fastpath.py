"""Start-up fast path for the hottest call, `kvpki sign-csr`, which services run thousands of times.

Importing click costs about as much as signing itself, so the plain forms of
`sign-csr` are parsed here without it.  This parser accepts only a strict
subset (long options, one input); anything else — help, unknown or abbreviated
options, global options, mistakes — returns None and click handles it, so click
stays the single source of truth for usage and error messages.
"""

from __future__ import annotations

from collections.abc import Sequence

from kvpki_cli.signing import OUTPUT_SUFFIX, SignOptions

_VALUE_OPTIONS = {
    "--ca": "ca_name",
    "--profile": "profile",
    "--format": "fmt",
    "--requester": "requester",
    "--validity": "validity",
    "--subject": "subject",
}
_FLAG_OPTIONS = {"--chain": "with_chain"}


def parse_fast_sign(argv: Sequence[str]) -> SignOptions | None:
    """SignOptions for a simple `sign-csr` invocation, or None to let click parse it."""
    if not argv or argv[0] != "sign-csr":
        return None
    values: dict[str, object] = {}
    inputs: list[str] = []
    tokens = list(argv[1:])
    while tokens:
        token = tokens.pop(0)
        name, has_inline, inline = token.partition("=")
        if name in _VALUE_OPTIONS:
            if not has_inline:
                if not tokens or tokens[0].startswith("--"):
                    return None
                inline = tokens.pop(0)
            field = _VALUE_OPTIONS[name]
            if field in values or not inline:
                return None
            values[field] = inline
        elif token in _FLAG_OPTIONS:
            values[_FLAG_OPTIONS[token]] = True
        elif token == "-" or not token.startswith("-"):
            inputs.append(token)
        else:
            return None
    if "ca_name" not in values or len(inputs) > 1 or values.get("fmt", "pem") not in OUTPUT_SUFFIX:
        return None
    return SignOptions(csr_files=tuple(inputs), **values)  # type: ignore[arg-type]
