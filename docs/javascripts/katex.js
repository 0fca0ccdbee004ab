// Render the formulas that pymdownx.arithmatex (generic mode) marks: \( ... \) inline, \[ ... \] displayed.
// Only those elements are touched, so a dollar sign elsewhere on a page stays text.
document$.subscribe(({ body }) => {
  for (const element of body.querySelectorAll(".arithmatex")) {
    renderMathInElement(element, {
      delimiters: [
        { left: "\\[", right: "\\]", display: true },
        { left: "\\(", right: "\\)", display: false },
      ],
      throwOnError: false,
    });
  }
});
