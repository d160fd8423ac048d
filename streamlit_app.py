"""bonescan: the router. Page config, the shared sidebar, and navigation; nothing else."""

import streamlit as st

from pages.common import sidebar

st.set_page_config(page_title="bonescan", page_icon=":material/radiology:", layout="wide")

PAGES = [
    st.Page("pages/scans.py", title="Scans", icon=":material/photo_library:", url_path="scans", default=True),
]

navigation = st.navigation(PAGES)
sidebar()
navigation.run()
