"""The paper's experiments (Robertson & Koyejo, ICML 2024), one module each."""
