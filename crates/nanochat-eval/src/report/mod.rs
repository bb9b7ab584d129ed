//! The report card (markdown + JSON + SVG curves).
