// A tiny DOM helper. Every string goes in as text (textContent / attributes), never as HTML:
// prompts and server messages are user text.

/** el("button", {class: "x", dataset: {testid: "go"}, onclick: f}, "Go", child...) */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "dataset") Object.assign(node.dataset, value);
    else if (key.startsWith("on") && typeof value === "function") node.addEventListener(key.slice(2), value);
    else if (key === "class") node.className = value;
    else if (key in node && typeof value !== "string") node[key] = value; // checked, value, disabled...
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  append(node, children);
  return node;
}

function append(node, children) {
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

/** Replace an element's children. */
export function fill(node, ...children) {
  node.replaceChildren();
  append(node, children);
  return node;
}

/** A unique id for label/input pairs. */
let counter = 0;
export function uid(prefix = "f") {
  counter += 1;
  return `${prefix}-${counter}`;
}

/** A labelled control: returns [wrapper, control]. */
export function field(labelText, control, hint) {
  if (!control.id) control.id = uid();
  const wrapper = el("div", { class: "field" }, el("label", { for: control.id }, labelText), control);
  if (hint) wrapper.append(el("small", { class: "hint" }, hint));
  return wrapper;
}

/** A <select> over [value, text] pairs or plain strings. */
export function select(options, attrs = {}) {
  const node = el("select", attrs);
  for (const option of options) {
    const [value, text] = Array.isArray(option) ? option : [option, option];
    node.append(el("option", { value }, text));
  }
  return node;
}
