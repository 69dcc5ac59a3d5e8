"""insitu.privacy's public namespace is exactly what __all__ says (a misspelled export fails here)."""
import insitu.privacy as privacy


def test_all_names_resolve_and_nothing_public_is_missing():
    for name in privacy.__all__:
        assert getattr(privacy, name) is not None, name
    public = {n for n in vars(privacy) if not n.startswith("_") and n not in {"accounting", "budget", "clipping", "mechanisms", "cli"}}
    assert public == set(privacy.__all__)
