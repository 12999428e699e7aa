package doppel_test

import (
	"go/parser"
	"go/token"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestPackageDocs checks that every package has exactly one package comment.
func TestPackageDocs(t *testing.T) {
	dirs := map[string][]string{} // dir -> files holding a package doc
	err := filepath.WalkDir(".", func(path string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() {
			if name := d.Name(); path != "." && (strings.HasPrefix(name, ".") || name == "testdata") {
				return filepath.SkipDir
			}
			return nil
		}
		if !strings.HasSuffix(path, ".go") || strings.HasSuffix(path, "_test.go") {
			return nil
		}
		f, err := parser.ParseFile(token.NewFileSet(), path, nil, parser.PackageClauseOnly|parser.ParseComments)
		if err != nil {
			return err
		}
		if f.Name.Name == "main" && filepath.Dir(path) == "." {
			return nil
		}
		// bpf2go output and //go:build ignore sources carry no doc by design.
		if strings.Contains(path, "_bpfe") || strings.HasSuffix(path, ".c") {
			return nil
		}
		dir := filepath.Dir(path)
		if _, ok := dirs[dir]; !ok {
			dirs[dir] = nil
		}
		if f.Doc != nil {
			dirs[dir] = append(dirs[dir], path)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	for dir, docs := range dirs {
		switch len(docs) {
		case 0:
			t.Errorf("package in %s has no package doc comment", dir)
		case 1:
		default:
			t.Errorf("package in %s has doc comments in several files: %v", dir, docs)
		}
	}
}
