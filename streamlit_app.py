"""bonescan: the router. Page config, the sign-in gate, the shared sidebar, and navigation; nothing else.

The page scripts live in ``app_pages/``, not ``pages/``: Streamlit treats a ``pages/`` folder
beside the main script as a legacy page list, and on a fresh server a deep link such as
``/review`` would then run the page script directly, without this router. The default page
(Scans) is served at ``/``.
"""

import streamlit as st

from app_pages.common import gate, sidebar
from bonescan_core.errors import DatabaseUnavailable

st.set_page_config(page_title="bonescan", page_icon=":material/radiology:", layout="wide")

PAGES = [
    st.Page("app_pages/scans.py", title="Scans", icon=":material/photo_library:", default=True),
    st.Page("app_pages/review.py", title="Review", icon=":material/rate_review:", url_path="review"),
    st.Page("app_pages/agreement.py", title="Agreement", icon=":material/group:", url_path="agreement"),
    st.Page("app_pages/train.py", title="Train", icon=":material/model_training:", url_path="train"),
    st.Page("app_pages/evaluate.py", title="Evaluate", icon=":material/query_stats:", url_path="evaluate"),
]

navigation = st.navigation(PAGES)
try:
    if gate():  # with sign-in required, only the sign-in form until someone signs in
        sidebar()
        navigation.run()
except DatabaseUnavailable as error:  # damaged or read-only labels.db: what to do, not a traceback
    st.error(str(error), icon=":material/database:")
    st.stop()
