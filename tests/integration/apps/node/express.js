const express = require('express');
const app = express();
app.get('/', (req, res) => res.send(`hello from pid ${process.pid}\n`));
app.get('/slow', (req, res) => setTimeout(() => res.send(`slow answer from pid ${process.pid}\n`), Number(process.env.SLOW_MS || 1500)));
app.listen(process.env.PORT, () => console.log(`express on ${process.env.PORT}`));
