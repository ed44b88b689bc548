"""refgen's local HTTP API, a thin front-end over the library: Leonardo's REST v1 paths (server), the
asset store and job queue (store), the worker that runs jobs on an Engine (jobs), and the translation
of Leonardo's JSON to refgen requests and back (leonardo). Importing it loads neither torch nor OpenCV."""
