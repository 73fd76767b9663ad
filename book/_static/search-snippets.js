// Search result snippets are cut from each page's HTML, where the maths is still TeX source (MathJax
// typesets it in the browser): a snippet read "the data \(\mathcal N(0.5, 0.8^2)\), the VP SDE with
// \(b(s) \in [0.1, 20]\)". This wraps Sphinx's Search.htmlToText (Sphinx 7) so that every maths element
// is turned into plain text first: "the data N(0.5, 0.8^2), the VP SDE with b(s) ∈ [0.1, 20]".
// Only the snippets change; the search index and the pages do not.
(function () {
  "use strict";

  const SYMBOLS = {
    alpha: "α", beta: "β", gamma: "γ", delta: "δ", epsilon: "ε", varepsilon: "ε", zeta: "ζ", eta: "η",
    theta: "θ", vartheta: "θ", iota: "ι", kappa: "κ", lambda: "λ", mu: "μ", nu: "ν", xi: "ξ", pi: "π",
    rho: "ρ", sigma: "σ", varsigma: "ς", tau: "τ", upsilon: "υ", phi: "φ", varphi: "φ", chi: "χ",
    psi: "ψ", omega: "ω", Gamma: "Γ", Delta: "Δ", Theta: "Θ", Lambda: "Λ", Xi: "Ξ", Pi: "Π",
    Sigma: "Σ", Phi: "Φ", Psi: "Ψ", Omega: "Ω",
    nabla: "∇", partial: "∂", infty: "∞", int: "∫", sum: "∑", prod: "∏", sqrt: "√",
    le: "≤", leq: "≤", ge: "≥", geq: "≥", ne: "≠", neq: "≠", approx: "≈", sim: "~", propto: "∝",
    to: "→", rightarrow: "→", leftarrow: "←", mapsto: "↦", Rightarrow: "⇒", iff: "⇔",
    in: "∈", notin: "∉", subset: "⊂", cdot: "·", cdots: "⋯", ldots: "…", dots: "…", times: "×",
    pm: "±", mid: "|", "|": "‖", top: "ᵀ", circ: "∘", star: "⋆", ell: "ℓ",
    E: "E", R: "ℝ", KL: "KL", Law: "L",
  };
  // commands that only change the look of their argument, or spacing: keep the argument, drop the command
  const DROP = /\\(?:mathcal|mathbb|mathrm|mathbf|mathsf|mathit|boldsymbol|bm|operatorname|text|textrm|textbf|textit|mbox|rm|bf|it|cal|displaystyle|left|right|big|Big|bigg|Bigg|bigl|bigr|Bigl|Bigr|biggl|biggr|limits|nolimits)\b/g;

  function readable(tex) {
    let s = tex.trim();
    s = s.replace(/^\\\(|\\\)$/g, "").replace(/^\\\[|\\\]$/g, "");
    s = s.replace(/\\begin\{[a-z*]+\}|\\end\{[a-z*]+\}/g, "");
    s = s.replace(/\\label\{[^}]*\}|\\tag\{[^}]*\}|\\nonumber/g, "");
    s = s.replace(/\\[td]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}/g, "($1)/($2)");
    s = s.replace(/\\(?:,|;|:|!|quad|qquad| )/g, " ");
    s = s.replace(/\\\\|&/g, " ");
    s = s.replace(DROP, "");
    s = s.replace(/\\([A-Za-z]+|\|)/g, (m, name) => (name in SYMBOLS ? SYMBOLS[name] : name));
    s = s.replace(/[{}]/g, "");
    return s.replace(/\s+/g, " ").trim();
  }

  function patch() {
    if (typeof Search === "undefined" || typeof Search.htmlToText !== "function" || Search._sacodeReadableMath) {
      return;
    }
    const htmlToText = Search.htmlToText;
    Search.htmlToText = (htmlString, anchor) => {
      const doc = new DOMParser().parseFromString(htmlString, "text/html");
      doc.querySelectorAll(".math").forEach((el) => {
        el.querySelectorAll(".eqno, .headerlink").forEach((child) => child.remove());
        el.textContent = " " + readable(el.textContent) + " ";
      });
      return htmlToText(doc.documentElement.outerHTML, anchor);
    };
    Search._sacodeReadableMath = true;
  }

  window.sacodeReadableTeX = readable;   // for the browser test
  patch();
  document.addEventListener("DOMContentLoaded", patch);
})();
