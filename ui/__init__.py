"""Shared Streamlit UI code for the pages (see ui/core.py).

Multipage fix: Streamlit runs in its old "pages/ folder" mode (each page file alone, without app.py's navigation,
sidebar and wide layout) until app.py has called st.navigation once in this server process. A first visitor who
opens a shared link such as /train on a freshly started server would hit that mode. Every page imports ui, so the
first import switches the mode off and reruns: the run then goes through app.py like every later one.
"""
from streamlit.runtime.pages_manager import PagesManager as _PagesManager

if _PagesManager.uses_pages_directory:
    import streamlit as _st

    _PagesManager.uses_pages_directory = False
    _st.rerun()
