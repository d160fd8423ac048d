"""bonescan: the router. Page config, the shared sidebar, and navigation; nothing else."""

import streamlit as st

from pages.common import sidebar

st.set_page_config(page_title="bonescan", page_icon=":material/radiology:", layout="wide")

PAGES = [
    st.Page("pages/scans.py", title="Scans", icon=":material/photo_library:", url_path="scans", default=True),
    st.Page("pages/review.py", title="Review", icon=":material/rate_review:", url_path="review"),
    st.Page("pages/agreement.py", title="Agreement", icon=":material/group:", url_path="agreement"),
]

navigation = st.navigation(PAGES)
sidebar()
navigation.run()
