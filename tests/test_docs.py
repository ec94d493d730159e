"""Docs that cannot drift: the README's support matrix is the one generated from the registry, and the README
documents every registered op."""
import os

from fastlayers import cli, registry

README = os.path.join(os.path.dirname(__file__), "..", "README.md")


def test_readme_support_matrix_is_generated(capsys):
    rc = cli.main(["matrix", "--check", README])
    assert rc == 0, capsys.readouterr().out


def test_readme_documents_every_op():
    text = open(README, encoding="utf-8").read()
    for op in registry.get():
        for fn in op.functions or (op.name,):
            assert f"fastlayers.{fn}" in text, f"README has no API section for fastlayers.{fn}"
    assert "make test" in text and "make bench" in text
