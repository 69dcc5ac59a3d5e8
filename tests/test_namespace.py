import insitu


def test_all_names_resolve():
    for name in insitu.__all__:
        assert getattr(insitu, name) is not None, name


def test_simulate_is_the_library_function():
    from insitu.apps.simulate import simulate

    assert insitu.simulate is simulate
