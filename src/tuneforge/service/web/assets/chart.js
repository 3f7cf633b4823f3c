// The job's training curves: loss (left axis) and token accuracy (right axis, 0–1) by step, drawn with uPlot
// (vendor/uplot, loaded by the page before this module as the global `uPlot`).

const SERIES = [
  { key: "train_loss", label: "training loss", stroke: "#0b5cad", scale: "loss" },
  { key: "valid_loss", label: "validation loss", stroke: "#c2410c", scale: "loss" },
  { key: "train_mean_token_accuracy", label: "token accuracy (train)", stroke: "#15803d", scale: "acc", dash: [6, 4] },
  { key: "valid_mean_token_accuracy", label: "token accuracy (validation)", stroke: "#7e22ce", scale: "acc", dash: [6, 4] },
];

export class MetricsChart {
  constructor(container) {
    this.container = container;
    this.byStep = new Map();
    this.plot = null;
    new ResizeObserver(() => this.plot && this.plot.setSize(this.size())).observe(container);
  }

  size() {
    const width = Math.max(260, this.container.clientWidth);
    return { width, height: width < 500 ? 240 : 320 };
  }

  /** Add the `data` of metrics events ({step, train_loss, ...}); a step seen again replaces its point. */
  add(points) {
    for (const p of points) {
      if (p && Number.isFinite(p.step)) this.byStep.set(p.step, p);
    }
    const steps = [...this.byStep.keys()].sort((a, b) => a - b);
    const data = [steps, ...SERIES.map((s) => steps.map((step) => {
      const v = this.byStep.get(step)[s.key];
      return v === undefined ? null : v;
    }))];
    this.container.dataset.points = String(steps.length);
    if (!steps.length) return;
    if (!this.plot) this.plot = new uPlot(this.options(), data, this.container);  // eslint-disable-line no-undef
    else this.plot.setData(data);
  }

  options() {
    return {
      ...this.size(),
      scales: { x: { time: false }, acc: { range: [0, 1] } },
      series: [{ label: "step" }, ...SERIES.map((s) => ({ label: s.label, stroke: s.stroke, scale: s.scale,
        width: 2, dash: s.dash, spanGaps: true,
        value: (u, v) => (v === null || v === undefined ? "—" : v.toFixed(4)) }))],
      axes: [
        { label: "step" },
        { scale: "loss", label: "loss" },
        { scale: "acc", label: "token accuracy", side: 1, grid: { show: false } },
      ],
      legend: { live: true },
      cursor: { drag: { x: true, y: false } },
    };
  }
}
