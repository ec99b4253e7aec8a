"""The workspace server (``studio serve``): workspaces with EMR Studio's lifecycle, one JupyterLab
per running workspace, computes (Livy URLs) to attach, and the Studio web UI."""
