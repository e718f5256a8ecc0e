// Word diff between two prompts: what the Cinematographer changed from one iteration to the
// next. A longest-common-subsequence over words (prompts are a few hundred words at most, so
// the quadratic table is small) gives runs of kept, removed and added words.
export function wordDiff(before, after) {
  const a = tokens(before);
  const b = tokens(after);
  const n = a.length;
  const m = b.length;
  const lcs = Array.from({ length: n + 1 }, () => new Uint16Array(m + 1));
  for (let i = n - 1; i >= 0; i--) {
    for (let j = m - 1; j >= 0; j--) {
      lcs[i][j] = a[i] === b[j] ? lcs[i + 1][j + 1] + 1 : Math.max(lcs[i + 1][j], lcs[i][j + 1]);
    }
  }
  const runs = [];
  const push = (op, word) => {
    const last = runs[runs.length - 1];
    if (last && last.op === op) last.words.push(word);
    else runs.push({ op, words: [word] });
  };
  let i = 0;
  let j = 0;
  while (i < n && j < m) {
    if (a[i] === b[j]) { push("same", a[i]); i++; j++; }
    else if (lcs[i + 1][j] >= lcs[i][j + 1]) push("del", a[i++]);
    else push("add", b[j++]);
  }
  while (i < n) push("del", a[i++]);
  while (j < m) push("add", b[j++]);
  return runs.map((run) => ({ op: run.op, text: run.words.join(" ") }));
}

function tokens(text) {
  return (text || "").split(/\s+/).filter(Boolean);
}
