"""insitu.privacy's public namespace is exactly what __all__ says (a misspelled export fails here)."""
import insitu.privacy as privacy


def test_all_names_resolve_and_nothing_public_is_missing():
    for name in privacy.__all__:
        assert getattr(privacy, name) is not None, name
    import types

    # submodules become attributes once imported anywhere in the process; they are not exported names
    public = {n for n, v in vars(privacy).items() if not n.startswith("_") and not isinstance(v, types.ModuleType)}
    assert public == set(privacy.__all__)
