"""The web dashboard of ``dllmctl serve --dashboard``: a static page (``static/``) and the data
endpoints it polls (``routes``), built from what the nodes and the jobs' coordinators say now (``data``)."""
