"""The DTK side with the fixture builder: ``fixture_dtk.py ZIPAPP dtk-build-driver``.

The shared directory's launcher runs ``python3 <zipapp> dtk-build-driver``; the test environment puts a
``python3`` first on PATH (``harness.fixture_python``) that runs this file instead, with the same
arguments. The product is imported from the zipapp (what ships, on the DTK image's Python); only the
builder differs: :class:`fixture_builder.FixtureBuilder`, given to ``dtk_main.main`` as its argument.
The product itself never loads code named by its environment.
"""

import os
import sys

if __name__ == "__main__":
    zipapp, argv = sys.argv[1], sys.argv[2:]
    sys.path[:0] = [zipapp, os.path.dirname(os.path.abspath(__file__))]
    from fixture_builder import FixtureBuilder

    from driver_ctr.toolkit.dtk_main import main

    sys.exit(main(argv, builder=FixtureBuilder()))
