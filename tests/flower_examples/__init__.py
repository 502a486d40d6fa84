"""Small Flower example apps, written the way Flower's quickstarts are, for end-to-end tests.

Each module pairs a ``ClientApp`` (``@app.train`` / ``@app.evaluate``) with a ServerApp
factory whose ``@app.main()`` calls ``strategy.start(...)`` like Flower's quickstarts do:

- :mod:`.pytorch_cnn`: quickstart-pytorch with a BatchNorm2d CNN (``num_batches_tracked`` is an
  int64 array of shape ``()``), on 8x8 single-channel images;
- :mod:`.sklearn_logreg`: quickstart-sklearn with ``LogisticRegression(solver="saga")``, whose
  ``coef_`` is Fortran-ordered float64, exchanged as ``ArrayRecord([coef_, intercept_])``.

Data are synthetic (:mod:`.data`), generated from fixed seeds, so the tests run offline.
:mod:`.harness` runs several strategies one after another in one Flower simulation and keeps
what each round produced.
"""
