package bench

import (
	"fmt"
	"math"
	"os"
	"path/filepath"
	"strings"
)

// ReplaceSection replaces, in the Markdown file at path, the section whose
// heading line is heading (up to the next heading of the same or a higher
// level, or the first subheading that body does not itself contain: a
// hand-written subsection placed after the generated ones is kept) with
// body, or appends body when there is no such section. body must start with
// the heading line. The file is replaced atomically.
func ReplaceSection(path, heading, body string) error {
	old, err := os.ReadFile(path)
	if err != nil && !os.IsNotExist(err) {
		return fmt.Errorf("replace section: %w", err)
	}
	out := SpliceSection(string(old), heading, body)
	tmp, err := os.CreateTemp(filepath.Dir(path), ".results-*")
	if err != nil {
		return fmt.Errorf("replace section: %w", err)
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.WriteString(out); err != nil {
		tmp.Close()
		return fmt.Errorf("replace section: %w", err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("replace section: %w", err)
	}
	if err := os.Chmod(tmp.Name(), 0o644); err != nil {
		return fmt.Errorf("replace section: %w", err)
	}
	return os.Rename(tmp.Name(), path)
}

// SpliceSection is ReplaceSection on a string.
func SpliceSection(doc, heading, body string) string {
	body = strings.TrimRight(body, "\n") + "\n"
	level := headingLevel(heading)
	own := map[string]bool{}
	for _, l := range strings.Split(body, "\n") {
		if headingLevel(l) > 0 {
			own[l] = true
		}
	}
	lines := strings.SplitAfter(doc, "\n")
	start, end := -1, len(lines)
	inFence := false
	for i, l := range lines {
		t := strings.TrimRight(l, "\n")
		if strings.HasPrefix(t, "```") {
			inFence = !inFence
			continue
		}
		if inFence {
			continue
		}
		if start < 0 {
			if t == heading {
				start = i
			}
			continue
		}
		if lv := headingLevel(t); lv > 0 && (lv <= level || !own[t]) {
			end = i
			break
		}
	}
	if start < 0 {
		doc = strings.TrimRight(doc, "\n")
		if doc == "" {
			return body
		}
		return doc + "\n\n" + body
	}
	before := strings.Join(lines[:start], "")
	after := strings.Join(lines[end:], "")
	if after != "" {
		body += "\n"
	}
	return before + body + after
}

// headingLevel is the number of leading '#' of an ATX heading line, or 0.
func headingLevel(line string) int {
	n := 0
	for n < len(line) && line[n] == '#' {
		n++
	}
	if n == 0 || n > 6 || n == len(line) || line[n] != ' ' {
		return 0
	}
	return n
}

// FormatRatio formats a ratio as "1.23×", or "n/a".
func FormatRatio(r float64) string {
	if math.IsNaN(r) || math.IsInf(r, 0) {
		return "n/a"
	}
	return fmt.Sprintf("%.2f×", r)
}

// FormatCount formats n with thousands separators ("75,123"); small values
// keep one decimal.
func FormatCount(n float64) string {
	if math.IsNaN(n) {
		return "n/a"
	}
	if n < 100 {
		return fmt.Sprintf("%.1f", n)
	}
	s := fmt.Sprintf("%.0f", n)
	var b strings.Builder
	for i, c := range s {
		if i > 0 && (len(s)-i)%3 == 0 {
			b.WriteByte(',')
		}
		b.WriteRune(c)
	}
	return b.String()
}

// FormatMicros formats nanoseconds as microseconds ("64 µs", "1.2 ms").
func FormatMicros(ns float64) string {
	switch {
	case math.IsNaN(ns):
		return "n/a"
	case ns >= 10e6:
		return fmt.Sprintf("%.0f ms", ns/1e6)
	case ns >= 1e6:
		return fmt.Sprintf("%.1f ms", ns/1e6)
	case ns >= 100e3:
		return fmt.Sprintf("%.0f µs", ns/1e3)
	default:
		return fmt.Sprintf("%.1f µs", ns/1e3)
	}
}

// ShellJoin joins args for display as a shell command line, single-quoting
// those that need it.
func ShellJoin(args []string) string {
	out := make([]string, len(args))
	for i, a := range args {
		if a != "" && strings.IndexFunc(a, func(r rune) bool {
			return !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || strings.ContainsRune("-_./=:,+@%", r))
		}) < 0 {
			out[i] = a
			continue
		}
		out[i] = "'" + strings.ReplaceAll(a, "'", `'\''`) + "'"
	}
	return strings.Join(out, " ")
}
