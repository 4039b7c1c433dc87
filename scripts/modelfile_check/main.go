// Renders an Ollama TEMPLATE with Go's text/template (what Ollama uses) for chats read as JSON;
// scripts/check_modelfile.py compares the output with the Hugging Face chat template.
package main

import (
	"encoding/json"
	"os"
	"text/template"
)

type Msg struct {
	Role    string
	Content string
}

func main() {
	tplText, _ := os.ReadFile(os.Args[1])
	var chats [][]Msg
	raw, _ := os.ReadFile(os.Args[2])
	json.Unmarshal(raw, &chats)
	t := template.Must(template.New("m").Parse(string(tplText)))
	var outs []string
	for _, c := range chats {
		var b = new(stringsBuilder)
		t.Execute(b, map[string]any{"Messages": c})
		outs = append(outs, b.s)
	}
	j, _ := json.Marshal(outs)
	os.Stdout.Write(j)
}

type stringsBuilder struct{ s string }

func (b *stringsBuilder) Write(p []byte) (int, error) { b.s += string(p); return len(p), nil }
