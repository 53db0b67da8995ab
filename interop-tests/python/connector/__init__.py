"""Conformance harness of the vLLM connector (a package, so that its conftest does not shadow the
parent directory's ``conftest`` module, which other test files import by name)."""
