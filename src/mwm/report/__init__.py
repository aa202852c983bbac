"""Figures for people: contact sheets and (later) the HTML report."""
