"""pyramid's built-in plugins. Each module is exposed through the ``pyramid_core`` entry-point
group in pyproject.toml, exactly as a third-party plugin package would expose its own."""

import logging

logging.getLogger(__name__).addHandler(logging.NullHandler())  # the application adds handlers
